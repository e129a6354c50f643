//! Operator subcommands that work on a configuration without running the
//! host: webhook inspection and repair, plugin checks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use crate::config::{resolve_plugin, Config};
use crate::nutanix::registrar::{
    client_for, client_with, expand, fingerprint_path, is_ours, recorded_uuid, sync_webhook,
    webhook_name, webhook_uuid_path, SyncTarget,
};
use crate::runtime::{PluginSettings, Runtime, RuntimeOptions};
use crate::secret::BasicCredentials;

pub enum WebhookCommand {
    List(PathBuf),
    Sync(PathBuf),
    Remove(PathBuf),
}

pub async fn webhooks(cmd: WebhookCommand) -> anyhow::Result<ExitCode> {
    let (path, action) = match &cmd {
        WebhookCommand::List(p) => (p, "list"),
        WebhookCommand::Sync(p) => (p, "sync"),
        WebhookCommand::Remove(p) => (p, "remove"),
    };
    let config = Config::load(path)?;
    let mut failed = false;
    let events = if action == "sync" {
        expand(&subscriptions(&config).await?)
    } else {
        Vec::new()
    };
    for cluster in &config.clusters {
        let client = client_for(&config, cluster)?;
        let ours = webhook_name(&config, &cluster.name);
        let url = config.callback_url(&cluster.name);
        let uuid_path = webhook_uuid_path(&config, &cluster.name);
        let recorded = recorded_uuid(&uuid_path);
        let result: anyhow::Result<()> = async {
            let hooks = client.list_webhooks().await?;
            match action {
                "list" => {
                    println!(
                        "cluster {} ({}): {} webhook(s)",
                        cluster.name,
                        cluster.prism_url,
                        hooks.len()
                    );
                    for h in &hooks {
                        let mine = if is_ours(h, &url, recorded.as_deref()) {
                            "  [this host]"
                        } else {
                            ""
                        };
                        println!(
                            "  {}  {}  {}  {} events  {}{mine}",
                            h.uuid,
                            h.state,
                            h.name,
                            h.events.len(),
                            h.post_url
                        );
                    }
                }
                "remove" => {
                    let mut n = 0;
                    for h in hooks
                        .iter()
                        .filter(|h| is_ours(h, &url, recorded.as_deref()))
                    {
                        client.delete_webhook(&h.uuid).await?;
                        n += 1;
                    }
                    println!(
                        "cluster {}: removed {n} webhook(s) of this host",
                        cluster.name
                    );
                }
                _ => {
                    refuse_new_credentials_elsewhere(&config, cluster, &hooks, &ours)?;
                    let auth = BasicCredentials {
                        user: cluster.webhook_user.clone(),
                        password: crate::nutanix::webhook_password(&config, cluster)?,
                    };
                    let target = SyncTarget {
                        client: &client,
                        cluster: &cluster.name,
                        name: ours.clone(),
                        description: format!(
                            "prismhook instance `{}`: managed, do not edit",
                            config.instance
                        ),
                        post_url: url.clone(),
                        events: events.clone(),
                        // Every plugin loaded, or the sync failed above.
                        widen_only: false,
                        auth: &auth,
                        fingerprint_path: fingerprint_path(&config, &cluster.name),
                        uuid_path: uuid_path.clone(),
                    };
                    match sync_webhook(&target).await? {
                        Some(uuid) if events.is_empty() => println!(
                            "cluster {}: no plugin subscribes to anything; webhook {uuid} left as it is",
                            cluster.name
                        ),
                        Some(uuid) => println!(
                            "cluster {}: webhook {uuid} in sync ({} events)",
                            cluster.name,
                            events.len()
                        ),
                        None => println!(
                            "cluster {}: no plugin subscribes to anything; no webhook",
                            cluster.name
                        ),
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            eprintln!("cluster {}: {e:#}", cluster.name);
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Refuses to make up webhook credentials in a data directory that is
/// relative to where the command runs, for a webhook Prism already has: the
/// host keeps them in its own data directory, and a command run elsewhere
/// would give Prism a password the running host refuses (every
/// notification a 401).
fn refuse_new_credentials_elsewhere(
    config: &Config,
    cluster: &crate::config::ClusterConfig,
    hooks: &[crate::nutanix::Webhook],
    ours: &str,
) -> anyhow::Result<()> {
    let data = &config.storage.data_dir;
    let kept = data.join("webhook-credentials").join(&cluster.name);
    let generated = cluster.webhook_password.is_none();
    if !generated || !data.is_relative() || kept.exists() || !hooks.iter().any(|h| h.name == ours) {
        return Ok(());
    }
    let cluster = &cluster.name;
    let here = std::env::current_dir().unwrap_or_default();
    anyhow::bail!(
        "cluster {cluster}: no webhook credentials in {}, which is relative to this \
         directory ({}): run the command where the host runs, give storage.data_dir as an \
         absolute path, or set the cluster's webhook_password; a new password would lock the \
         running host's webhook out",
        kept.display(),
        here.display()
    )
}

/// The union of the subscriptions of the plugins in the configured
/// directory (each loaded and `init`-ed as the host would).
async fn subscriptions(config: &Config) -> anyhow::Result<Vec<String>> {
    let dir = tempfile_dir()?;
    let runtime = Runtime::new(RuntimeOptions::new(dir.join("kv.redb")))?;
    let mut subs = Vec::new();
    // The same plugins the host runs: instances, and settings files.
    let plugins = crate::reload::describe(config).with_context(|| {
        format!(
            "reading the plugins directory {}",
            config.plugins.dir.display()
        )
    })?;
    // A plugin left out would take its event types out of the webhook: the
    // sync fails instead, naming each one and why.
    let mut failed = Vec::new();
    for plugin in plugins {
        let (file, settings) = match (plugin.component, plugin.settings) {
            (Ok(_), Ok(settings)) if !settings.enabled => continue,
            (Ok(file), Ok(settings)) => (file, settings),
            (Err(e), _) | (_, Err(e)) => {
                failed.push(format!("{}: {e}", plugin.key));
                continue;
            }
        };
        let resolved = match resolve_plugin(&settings, &plugin.key, config.default_limits()) {
            Ok(resolved) => resolved,
            Err((k, m)) => {
                failed.push(format!("{}: `{k}`: {m}", plugin.key));
                continue;
            }
        };
        match runtime
            .load_read(&file, None, resolved, plugin.instance)
            .await
        {
            Ok(p) => subs.extend(p.info().subscriptions.iter().cloned()),
            Err(e) => failed.push(format!("{}: {e}", file.display())),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        anyhow::bail!(
            "{} plugin(s) in {} cannot be loaded, so the webhook cannot name their events; fix \
             them, or set `enabled = false` in their settings:\n  {}",
            failed.len(),
            config.plugins.dir.display(),
            failed.join("\n  ")
        );
    }
    Ok(subs)
}

/// A fresh private directory (mode 0700) for a command's scratch kv, as
/// mkdtemp makes one: never a path that already exists, which another
/// local user could have made, or pointed elsewhere with a symlink.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let name = format!(
            "prismhook-cli-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let dir = base.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating a directory in {}", base.display()))
            }
        }
    }
    anyhow::bail!(
        "no fresh temporary directory could be made in {}",
        base.display()
    )
}

/// `prismhook config check`: the file parses, and everything it names that
/// the host reads at start can be read: every secret (from the
/// environment or a file, as the service would see them), and the TLS
/// certificates and keys, which must go together. Prints what is wrong,
/// each with the key it is under, or one line saying what the file
/// configures.
pub fn config_check(path: &Path) -> ExitCode {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let unreadable = |key: String, source: Option<&crate::secret::SecretSource>| {
        let e = source?.resolve().err()?;
        Some(format!("`{key}`: {e}"))
    };
    if let Err(e) = crate::app::admin_token(&c.admin) {
        problems.push(format!("{e:#}"));
    }
    if let Some(js) = &c.storage.jetstream {
        problems.extend(unreadable(
            "storage.jetstream.password".into(),
            js.password.as_ref(),
        ));
        problems.extend(unreadable(
            "storage.jetstream.token".into(),
            js.token.as_ref(),
        ));
        if let Some(path) = &js.credentials {
            let read = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    async_nats::ConnectOptions::with_credentials(&text).map_err(|e| e.to_string())
                });
            if let Err(e) = read {
                problems.push(format!(
                    "`storage.jetstream.credentials`: {}: {e}",
                    path.display()
                ));
            }
        }
        if let Some(ca) = &js.ca_file {
            // The NATS client reads PEM certificates only.
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>());
            let problem = match certs {
                Ok(certs) if certs.is_empty() => Some("no PEM certificate in it".to_owned()),
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                problems.push(format!(
                    "`storage.jetstream.ca_file`: {}: {problem}",
                    ca.display()
                ));
            }
        }
    }
    for (j, cluster) in c.clusters.iter().enumerate() {
        // The client as at start, sending nothing: its password, then its
        // trust (a CA file, a pinned certificate).
        match cluster.password.resolve() {
            Err(e) => problems.push(format!("`cluster[{j}].password`: {e}")),
            Ok(password) => {
                if let Err(e) = client_with(&c, cluster, &password) {
                    problems.push(format!("`cluster[{j}].tls`: {e:#}"));
                }
            }
        }
        problems.extend(unreadable(
            format!("cluster[{j}].webhook_password"),
            cluster.webhook_password.as_ref(),
        ));
    }
    for (name, settings) in &c.plugin {
        match resolve_plugin(settings, name, c.default_limits()) {
            Err((key, message)) => problems.push(format!("`{key}`: {message}")),
            Ok(resolved) => {
                if let Err(e) = crate::outbound::with_tls(reqwest::Client::builder(), &resolved.tls)
                {
                    problems.push(format!("`plugin.{name}.tls`: {e}"));
                }
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for (key, files) in [
        ("listener.tls", &c.listener.tls),
        ("admin.tls", &c.admin.tls),
    ] {
        if let Some(files) = files {
            if let Err(e) =
                crate::serve::tls::CertFiles::load(&files.cert, &files.key, provider.clone())
            {
                problems.push(format!("`{key}`: {e}"));
            }
        }
    }
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("{}: {problem}", path.display());
        }
        return ExitCode::FAILURE;
    }
    let ledger = match &c.storage.jetstream {
        Some(js) => format!(
            "JetStream stream {} on {}",
            js.stream,
            js.servers.join(", ")
        ),
        None => format!("redb in {}", c.storage.data_dir.display()),
    };
    println!(
        "{}: valid ({} cluster(s), {} plugin setting(s), listener {}, ledger: {ledger})",
        path.display(),
        c.clusters.len(),
        c.plugin.len(),
        c.listener.listen
    );
    ExitCode::SUCCESS
}

/// `prismhook plugin check FILE`: loads a component as the host would and
/// says whether it fits, with its imports, size and compile time.
pub async fn plugin_check(file: &Path, config: serde_json::Value) -> anyhow::Result<ExitCode> {
    let dir = tempfile_dir()?;
    let runtime = Runtime::new(RuntimeOptions::new(dir.join("kv.redb")))?;
    let started = Instant::now();
    let rt = runtime.clone();
    let path = file.to_owned();
    let compiled = tokio::task::spawn_blocking(move || rt.compile_file(&path, None)).await?;
    let compiled = match compiled {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL  {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let compile_time = started.elapsed();
    let size = compiled.size;
    let imports: Vec<String> = component_imports(&runtime, &compiled.component);
    let settings = PluginSettings {
        config,
        ..Default::default()
    };
    let result = match Arc::clone(&runtime)
        .instantiate(compiled, settings, None)
        .await
    {
        // As the host serves it once its snapshot after init is made.
        Ok(p) => Ok(runtime.pre_initialise(p).await),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!("file      {}", file.display());
    println!("size      {} KiB", size / 1024);
    println!("compile   {:.0} ms", compile_time.as_secs_f64() * 1000.0);
    println!("imports   {}", imports.join("\n          "));
    match result {
        Ok(p) => {
            println!("plugin    {} {}", p.name(), p.info().version);
            println!("events    {}", p.info().subscriptions.join(", "));
            match p.init_every_call() {
                _ if p.pre_initialised() => println!(
                    "init      once per load: calls start from a snapshot of the instance after init"
                ),
                Some(why) => println!("init      in every call: {why}"),
                None => println!("init      in every call"),
            }
            println!("OK        fits {}", crate::runtime::bindings::PACKAGE);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAIL      {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn component_imports(runtime: &Runtime, component: &wasmtime::component::Component) -> Vec<String> {
    let ty = component.component_type();
    ty.imports(runtime.engine())
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// `prismhook plugin new NAME --lang LANG [--dir DIR]`: writes a skeleton
/// into DIR/NAME and says how to build and check it.
pub fn plugin_new(
    parent: &Path,
    name: &str,
    lang: crate::scaffold::Lang,
) -> anyhow::Result<ExitCode> {
    let dir = match crate::scaffold::create(parent, name, lang) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("wrote a {lang} plugin skeleton in {}", dir.display());
    // `plugins/NAME` of a prismhook checkout is what `cargo xtask plugins NAME` builds.
    let checkout = match parent.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let in_checkout =
        parent.file_name().is_some_and(|n| n == "plugins") && checkout.join("xtask").is_dir();
    let build = if in_checkout {
        format!("cargo xtask plugins {name}")
    } else {
        format!("cargo xtask plugins --dir {}   (from a prismhook checkout; README.md says how by hand)", dir.display())
    };
    println!("build     {build}");
    println!("check     prismhook plugin check target/plugins/{name}.wasm");
    println!("install   copy target/plugins/{name}.wasm into the host's plugins directory");
    Ok(ExitCode::SUCCESS)
}
