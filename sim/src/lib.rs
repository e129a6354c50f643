pub mod panos; pub mod prism;
