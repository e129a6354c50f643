//! The host's outbound HTTP clients and proxies.
//!
//! reqwest follows `HTTP_PROXY`/`HTTPS_PROXY` by default, which would send
//! Prism's Basic auth and the plugins' injected credentials to whatever
//! proxy the environment names, over plain HTTP for `http://` targets.
//! prismhook ignores the environment unless `proxy_from_env` is set, and
//! then uses only `HTTPS_PROXY` (with `NO_PROXY`) for `https://` targets:
//! through a CONNECT tunnel, so the proxy sees host names but no
//! credentials. `http://` targets are always reached directly.

/// `builder` without the environment's proxies, or with `HTTPS_PROXY` for
/// `https://` targets when `from_env` is set. The error names the variable,
/// never its value (a proxy URL may hold a password).
pub fn with_proxy_policy(
    builder: reqwest::ClientBuilder,
    from_env: bool,
) -> Result<reqwest::ClientBuilder, String> {
    let builder = builder.no_proxy();
    if !from_env {
        return Ok(builder);
    }
    let Some((var, url)) = ["HTTPS_PROXY", "https_proxy"].into_iter().find_map(|v| {
        std::env::var(v)
            .ok()
            .filter(|u| !u.is_empty())
            .map(|u| (v, u))
    }) else {
        return Ok(builder);
    };
    let proxy = reqwest::Proxy::https(&url)
        .map_err(|_| format!("`{var}` is not a proxy URL"))?
        .no_proxy(reqwest::NoProxy::from_env());
    Ok(builder.proxy(proxy))
}
