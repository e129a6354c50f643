//! The client of Prism's v3 REST API: the webhook calls registration needs
//! and the VM inventory reconciling needs.
//!
//! Choices, and why:
//!
//! - **Errors name the cluster, the call and Prism's own words.** Prism
//!   answers errors as `{message_list: [{message, reason}]}`, except a 401,
//!   which has an HTML body; both become one readable reason. An operator
//!   with several clusters must see at once which one refuses what.
//! - **The password goes only into the `Authorization` header.** It is never
//!   part of a URL, a log field, an error or a `Debug` output, and any text
//!   echoed back by a server is scrubbed of it.
//! - **TLS is explicit.** Prism ships a self-signed certificate, so besides
//!   the public roots a cluster can be trusted through a CA file or by
//!   pinning its exact certificate; turning verification off is a separate,
//!   named mode.
//! - **Every call is bounded** (connect 5 s, whole request 30 s) and every
//!   list is paged to the end, because a client that hangs or stops at the
//!   first page silently breaks registration and reconciling.

use std::fmt;
use std::time::{Duration, Instant};

use futures_util::stream::{self, Stream};
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::Method;
use serde_json::{json, Value};
use url::Url;

use super::payload::{parse_vm, Vm};
pub use crate::outbound::TlsMode;
use crate::outbound::{read_body, with_tls, BodyError};
use prismhook_core::nutanix::pruned::{self, Keep};
use prismhook_core::nutanix::str_at;
pub use prismhook_core::nutanix::v3::Webhook;
use prismhook_core::nutanix::v3::{
    error_reason, parse_webhook, redact, status_messages, Listing, VM_LIST,
};
use prismhook_core::text::error_chain;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const API_SEGMENTS: [&str; 3] = ["api", "nutanix", "v3"];
const API_VERSION: &str = "3.1";
const WEBHOOK_PAGE: u64 = 100;
/// The largest page Prism's v3 list calls accept.
const VM_PAGE: u64 = 500;
/// No answer of Prism's is read past this: a page of 500 VMs is a few MB,
/// and an answer that never ends must not grow the host until it dies.
const MAX_ANSWER_BYTES: u64 = 64 << 20;
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(2);

/// Where a cluster is and how to talk to it.
#[derive(Clone)]
pub struct ClusterEndpoint {
    /// The cluster's name in prismhook's configuration; every error carries
    /// it.
    pub name: String,
    /// `https://host:9440`; a path of `/api/nutanix/v3` may be included.
    pub base_url: String,
    pub username: String,
    pub password: String,
    pub tls: TlsMode,
    /// Reach Prism through the proxy `HTTPS_PROXY`/`HTTP_PROXY` name
    /// (`NO_PROXY` honoured); otherwise the environment is ignored.
    pub proxy_from_env: bool,
}

impl fmt::Debug for ClusterEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterEndpoint")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("tls", &self.tls)
            .field("proxy_from_env", &self.proxy_from_env)
            .finish()
    }
}

/// A webhook as prismhook wants it registered.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    pub name: String,
    pub description: String,
    pub post_url: String,
    pub events: Vec<String>,
    /// `(username, password)` Prism sends to `post_url`.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("post_url", &self.post_url)
            .field("events", &self.events)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrismError {
    #[error("prism cluster `{cluster}`: {reason}")]
    Config { cluster: String, reason: String },
    #[error("prism cluster `{cluster}`: {method} {path}: request to {host} failed: {reason}")]
    Transport {
        cluster: String,
        method: String,
        path: String,
        host: String,
        reason: String,
    },
    #[error("prism cluster `{cluster}`: {method} {path} failed: {reason}")]
    Api {
        cluster: String,
        method: String,
        path: String,
        status: u16,
        reason: String,
    },
    #[error("prism cluster `{cluster}`: {method} {path}: unexpected answer: {reason}")]
    BadAnswer {
        cluster: String,
        method: String,
        path: String,
        reason: String,
    },
    #[error("prism cluster `{cluster}`: webhook {uuid} is still {state} after {waited:?}")]
    NotComplete {
        cluster: String,
        uuid: String,
        state: String,
        waited: Duration,
    },
    #[error("prism cluster `{cluster}`: webhook {uuid} ended in state {state}: {reason}")]
    Failed {
        cluster: String,
        uuid: String,
        state: String,
        reason: String,
    },
}

impl PrismError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            PrismError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// A stale `spec_version`: read the webhook again and retry.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

/// A client of one cluster; cheap to clone.
#[derive(Clone)]
pub struct PrismClient {
    cluster: String,
    api: Url,
    /// `host:port`, for errors.
    host: String,
    username: String,
    password: String,
    http: reqwest::Client,
}

impl fmt::Debug for PrismClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrismClient")
            .field("cluster", &self.cluster)
            .field("api", &self.api.as_str())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl PrismClient {
    /// Check the endpoint and load its TLS material; no request is made.
    pub fn new(endpoint: ClusterEndpoint) -> Result<PrismClient, PrismError> {
        let ClusterEndpoint {
            name,
            base_url,
            username,
            password,
            tls,
            proxy_from_env,
        } = endpoint;
        let config = |reason: String| PrismError::Config {
            cluster: name.clone(),
            reason,
        };
        let shown = redact_userinfo(&base_url);
        let mut api = Url::parse(&base_url)
            .map_err(|e| config(format!("base URL `{shown}` is not a URL: {e}")))?;
        if !api.username().is_empty() || api.password().is_some() {
            // Not echoed: the URL itself holds the secret.
            return Err(config(
                "the base URL must not carry credentials; set username and password instead"
                    .to_owned(),
            ));
        }
        if !matches!(api.scheme(), "https" | "http") {
            return Err(config(format!(
                "base URL `{shown}` must be https://host:9440"
            )));
        }
        let host = match (api.host_str(), api.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(config(format!("base URL `{shown}` has no host"))),
        };
        if api.scheme() == "http" && !is_loopback(&api) {
            tracing::warn!(
                cluster = %name,
                %host,
                "Prism is reached over plain HTTP: its password crosses the network unencrypted"
            );
        }
        api.set_query(None);
        api.set_fragment(None);
        // A prefix (a reverse proxy's) is kept; the API path is added once.
        let mut segments: Vec<String> = api
            .path_segments()
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !segments.ends_with(&API_SEGMENTS.map(str::to_owned)) {
            segments.extend(API_SEGMENTS.map(str::to_owned));
        }
        api.path_segments_mut()
            .map_err(|()| config(format!("base URL `{shown}` cannot take a path")))?
            .clear()
            .extend(&segments);
        let builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Followed, a 307 or 308 would send a create's or update's body,
            // which holds the webhook's password, wherever it pointed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("prismhook/", env!("CARGO_PKG_VERSION")));
        let builder =
            crate::outbound::with_proxy_policy(builder, proxy_from_env).map_err(config)?;
        let http = with_tls(builder, &tls)
            .map_err(config)?
            .build()
            .map_err(|e| config(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(PrismClient {
            cluster: name,
            api,
            host,
            username,
            password,
            http,
        })
    }

    /// The cluster's name as configured.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// `GET /users/me`: proves the address, certificate and credentials;
    /// returns the user's name as Prism knows it.
    pub async fn auth_check(&self) -> Result<String, PrismError> {
        let me = self.call(Method::GET, &["users", "me"], None).await?;
        Ok(str_at(&me, "/status/name")
            .or_else(|| str_at(&me, "/status/resources/display_name"))
            .unwrap_or(&self.username)
            .to_owned())
    }

    /// Every webhook on the cluster, whoever made it.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, PrismError> {
        let read = |entity: Value| {
            let hook = parse_webhook(&entity);
            if hook.is_none() {
                tracing::warn!(
                    cluster = %self.cluster,
                    "webhook without a uuid in the list answer skipped"
                );
            }
            hook
        };
        self.list_all("webhooks", "webhook", WEBHOOK_PAGE, read)
            .await
    }

    pub async fn get_webhook(&self, uuid: &str) -> Result<Webhook, PrismError> {
        let intent = self.call(Method::GET, &["webhooks", uuid], None).await?;
        self.webhook_from(&intent, Method::GET, uuid)
    }

    /// `POST /webhooks`; returns the new uuid. The webhook is `PENDING` until
    /// [`PrismClient::wait_complete`] sees it `COMPLETE`. Prism makes a new
    /// webhook for every create, even an identical one: list first.
    pub async fn create_webhook(&self, spec: &WebhookSpec) -> Result<String, PrismError> {
        let body = webhook_body(spec, json!({ "kind": "webhook" }));
        let answer = self.call(Method::POST, &["webhooks"], Some(&body)).await?;
        str_at(&answer, "/metadata/uuid")
            .map(str::to_owned)
            .ok_or_else(|| self.bad_answer(Method::POST, &["webhooks"], "no `metadata.uuid`"))
    }

    /// `PUT /webhooks/{uuid}` with the `spec_version` last read; a stale one
    /// fails with [`PrismError::is_conflict`]. The spec is replaced whole,
    /// so the credentials must be given again.
    pub async fn update_webhook(
        &self,
        uuid: &str,
        spec_version: u64,
        spec: &WebhookSpec,
    ) -> Result<(), PrismError> {
        let metadata = json!({ "kind": "webhook", "uuid": uuid, "spec_version": spec_version });
        let body = webhook_body(spec, metadata);
        self.call(Method::PUT, &["webhooks", uuid], Some(&body))
            .await
            .map(drop)
    }

    pub async fn delete_webhook(&self, uuid: &str) -> Result<(), PrismError> {
        self.call(Method::DELETE, &["webhooks", uuid], None)
            .await
            .map(drop)
    }

    /// Poll the webhook, backing off from 50 ms to 2 s, until it is
    /// `COMPLETE` (returned), in an error state, or `timeout` has passed.
    pub async fn wait_complete(
        &self,
        uuid: &str,
        timeout: Duration,
    ) -> Result<Webhook, PrismError> {
        let started = Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            let intent = self.call(Method::GET, &["webhooks", uuid], None).await?;
            let hook = self.webhook_from(&intent, Method::GET, uuid)?;
            match hook.state.as_str() {
                "COMPLETE" => return Ok(hook),
                "ERROR" | "FAILED" => {
                    let reason = status_messages(&intent, &self.secrets(None))
                        .unwrap_or_else(|| "no message".to_owned());
                    return Err(PrismError::Failed {
                        cluster: self.cluster.clone(),
                        uuid: uuid.to_owned(),
                        state: hook.state,
                        reason,
                    });
                }
                _ => {}
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(PrismError::NotComplete {
                    cluster: self.cluster.clone(),
                    uuid: uuid.to_owned(),
                    state: hook.state,
                    waited,
                });
            }
            tokio::time::sleep(pause.min(timeout - waited)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Every VM, paged by 500, read by the notification parser so that
    /// events and reconciles see a VM the same way: one item per page of
    /// Prism's answers, each parsed as it comes, so that the reader holds
    /// the pages it has not passed on yet, never a whole inventory. As for
    /// a notification, only what the parser reads of a page is built
    /// (`VM_LIST`). The stream ends after the last page, or with the first
    /// error.
    pub fn vm_pages(&self) -> impl Stream<Item = Result<Vec<Vm>, PrismError>> + Send + '_ {
        let start = (Listing::new(VM_PAGE), false, 0usize);
        stream::try_unfold(start, move |(mut listing, done, mut skipped)| async move {
            if done {
                return Ok(None);
            }
            let (entities, last) = self.list_page("vms", "vm", &VM_LIST, &mut listing).await?;
            let vms: Vec<Vm> = entities.iter().filter_map(parse_vm).collect();
            skipped += entities.len() - vms.len();
            if last && skipped > 0 {
                tracing::warn!(
                    cluster = %self.cluster,
                    skipped,
                    "VM intents without a uuid skipped"
                );
            }
            Ok(Some((vms, (listing, last, skipped))))
        })
    }

    /// `POST /{collection}/list`, page after page (see [`Listing`]), each
    /// entity kept as `read` makes it (or skipped, for `None`).
    async fn list_all<T>(
        &self,
        collection: &str,
        kind: &str,
        page: u64,
        mut read: impl FnMut(Value) -> Option<T>,
    ) -> Result<Vec<T>, PrismError> {
        let mut listing = Listing::new(page);
        let mut out = Vec::new();
        loop {
            let (entities, last) = self
                .list_page(collection, kind, &Keep::All, &mut listing)
                .await?;
            out.extend(entities.into_iter().filter_map(&mut read));
            if last {
                return Ok(out);
            }
        }
    }

    /// The next page of a listing: its entities, and whether it was the last.
    async fn list_page(
        &self,
        collection: &str,
        kind: &str,
        keep: &'static Keep,
        listing: &mut Listing,
    ) -> Result<(Vec<Value>, bool), PrismError> {
        let segments = [collection, "list"];
        let body = json!({ "kind": kind, "offset": listing.offset(), "length": listing.page() });
        let answer = self
            .call_keeping(Method::POST, &segments, Some(&body), keep)
            .await?;
        let page = listing
            .add(answer)
            .map_err(|e| self.bad_answer(Method::POST, &segments, &e.to_string()))?;
        Ok((page.entities, page.last))
    }

    fn webhook_from(
        &self,
        intent: &Value,
        method: Method,
        uuid: &str,
    ) -> Result<Webhook, PrismError> {
        parse_webhook(intent)
            .ok_or_else(|| self.bad_answer(method, &["webhooks", uuid], "no `metadata.uuid`"))
    }

    /// One v3 call; a 2xx answer's JSON body (null when empty), or an error
    /// that says who failed and why.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value, PrismError> {
        self.call_keeping(method, segments, body, &Keep::All).await
    }

    /// [`Self::call`], building only what `keep` says of the answer.
    async fn call_keeping(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        keep: &'static Keep,
    ) -> Result<Value, PrismError> {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .expect("checked in new: the base URL takes a path")
            .extend(segments);
        let mut request = self
            .http
            .request(method.clone(), url)
            .basic_auth(&self.username, Some(&self.password))
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(body) = body {
            request = request.json(body);
        }
        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| self.transport(&method, segments, e))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(self.redirected(method, segments, body, &response));
        }
        let bytes = match read_body(response, MAX_ANSWER_BYTES).await {
            Ok(bytes) => bytes,
            Err(BodyError::Transport(e)) => return Err(self.transport(&method, segments, e)),
            Err(BodyError::TooLarge) => {
                let reason = format!("the answer is larger than {} MiB", MAX_ANSWER_BYTES >> 20);
                return Err(self.bad_answer(method, segments, &reason));
            }
        };
        tracing::debug!(
            cluster = %self.cluster,
            method = %method,
            path = %display_path(segments),
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "prism call"
        );
        if !status.is_success() {
            return Err(PrismError::Api {
                cluster: self.cluster.clone(),
                method: method.to_string(),
                path: display_path(segments),
                status: status.as_u16(),
                reason: error_reason(status, &bytes, &self.secrets(body)),
            });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        pruned::read(&bytes, keep)
            .map_err(|e| self.bad_answer(method, segments, &format!("body is not JSON: {e}")))
    }

    fn transport(&self, method: &Method, segments: &[&str], e: reqwest::Error) -> PrismError {
        let reason = if e.is_timeout() && e.is_connect() {
            format!("no connection within {CONNECT_TIMEOUT:?}")
        } else if e.is_timeout() {
            format!("no answer within {REQUEST_TIMEOUT:?}")
        } else {
            error_chain(&e.without_url())
        };
        PrismError::Transport {
            cluster: self.cluster.clone(),
            method: method.to_string(),
            path: display_path(segments),
            host: self.host.clone(),
            reason: self.scrub(reason),
        }
    }

    /// A redirect is not followed: it says where `prism_url` should point.
    fn redirected(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        response: &reqwest::Response,
    ) -> PrismError {
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| {
                let shown = redact_userinfo(&l.chars().take(200).collect::<String>());
                redact(shown, &self.secrets(body))
            })
            .unwrap_or_else(|| "nowhere given".to_owned());
        PrismError::Api {
            cluster: self.cluster.clone(),
            method: method.to_string(),
            path: display_path(segments),
            status: status.as_u16(),
            reason: format!(
                "redirected ({}) to {location}; redirects are not followed, as they would take \
                 the credentials along: set the cluster's prism_url to the address Prism serves \
                 its API at",
                status.as_u16()
            ),
        }
    }

    fn bad_answer(&self, method: Method, segments: &[&str], reason: &str) -> PrismError {
        PrismError::BadAnswer {
            cluster: self.cluster.clone(),
            method: method.to_string(),
            path: display_path(segments),
            reason: self.scrub(reason.to_owned()),
        }
    }

    /// Servers and libraries sometimes echo what they were sent.
    fn scrub(&self, text: String) -> String {
        redact(text, &self.secrets(None))
    }

    /// The secrets a call sends, which its answer may echo: the password,
    /// and the webhook's password when `body` carries one.
    fn secrets<'a>(&'a self, body: Option<&'a Value>) -> Vec<&'a str> {
        let webhook = body
            .and_then(|b| b.pointer("/spec/resources/credentials/password"))
            .and_then(Value::as_str);
        [Some(self.password.as_str()), webhook]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// `scheme://user:pass@host` shown as `scheme://<redacted>@host`, for a URL
/// too broken to parse.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://<redacted>@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

fn webhook_body(spec: &WebhookSpec, metadata: Value) -> Value {
    let mut resources = json!({
        "post_url": spec.post_url,
        "events_filter_list": spec.events,
    });
    if let Some((username, password)) = &spec.credentials {
        resources["credentials"] = json!({ "username": username, "password": password });
    }
    json!({
        "api_version": API_VERSION,
        "metadata": metadata,
        "spec": {
            "name": spec.name,
            "description": spec.description,
            "resources": resources,
        },
    })
}

fn display_path(segments: &[&str]) -> String {
    segments.iter().fold(String::new(), |mut path, s| {
        path.push('/');
        path.push_str(s);
        path
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{StreamExt, TryStreamExt};
    use prismhook_sim::prism::{NewVm, PrismConfig, PrismFaults, PrismSim};

    const PASSWORD: &str = "nutanix/4u";

    async fn sim() -> PrismSim {
        PrismSim::start("127.0.0.1:0".parse().unwrap(), PrismConfig::default())
            .await
            .unwrap()
    }

    fn endpoint(base_url: String, password: &str) -> ClusterEndpoint {
        ClusterEndpoint {
            name: "lab".to_owned(),
            base_url,
            username: "admin".to_owned(),
            password: password.to_owned(),
            tls: TlsMode::System,
            proxy_from_env: false,
        }
    }

    /// `app` on a loopback port: its base URL, and the task to abort.
    async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", tcp.local_addr().unwrap());
        (
            base,
            tokio::spawn(async move { axum::serve(tcp, app).await }),
        )
    }

    fn client(sim: &PrismSim) -> PrismClient {
        PrismClient::new(endpoint(sim.base_url(), PASSWORD)).unwrap()
    }

    fn spec(name: &str, events: &[&str]) -> WebhookSpec {
        WebhookSpec {
            name: name.to_owned(),
            description: "managed by prismhook".to_owned(),
            post_url: "http://127.0.0.1:1/hook".to_owned(),
            events: events.iter().map(|e| e.to_string()).collect(),
            credentials: Some(("hook-user".to_owned(), "hook-secret".to_owned())),
        }
    }

    #[tokio::test]
    async fn auth_check_answers_the_user_name() {
        let sim = sim().await;
        assert_eq!(client(&sim).auth_check().await.unwrap(), "admin");
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn a_wrong_password_is_an_authentication_failure_that_does_not_leak_it() {
        let sim = sim().await;
        let secret = "wrong-but-secret";
        let c = PrismClient::new(endpoint(sim.base_url(), secret)).unwrap();
        let err = c.auth_check().await.unwrap_err();
        assert!(err.is_unauthorized());
        assert_eq!(
            err.to_string(),
            "prism cluster `lab`: GET /users/me failed: authentication failed (401)"
        );
        assert!(!format!("{err:?}{c:?}").contains(secret));
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn an_error_answer_echoing_the_request_does_not_show_the_webhook_password() {
        // Some API gateways answer a refused request with what it sent.
        let echo = axum::Router::new().route(
            "/api/nutanix/v3/webhooks",
            axum::routing::post(|body: String| async move {
                let message = format!("invalid spec: {body}");
                (
                    http::StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(
                        json!({ "message_list": [{ "message": message, "reason": "INVALID" }] }),
                    ),
                )
            }),
        );
        let (base, server) = serve(echo).await;
        let c = PrismClient::new(endpoint(base, PASSWORD)).unwrap();
        let err = c
            .create_webhook(&spec("ours", &["VM.ON"]))
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains("invalid spec") && shown.contains("hook-user"),
            "{shown}"
        );
        assert!(!shown.contains("hook-secret"), "{shown}");
        server.abort();
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_so_the_webhook_password_stays_home() {
        // Where a hostile or misconfigured gateway points: it must hear nothing.
        let heard = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = heard.clone();
        let elsewhere = axum::Router::new().fallback(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "ok" }
        });
        let (elsewhere, second) = serve(elsewhere).await;
        let target = format!("{elsewhere}/api/nutanix/v3/webhooks");
        let location = target.clone();
        let gateway = axum::Router::new().fallback(move || {
            let location = location.clone();
            async move {
                (
                    http::StatusCode::TEMPORARY_REDIRECT,
                    [(http::header::LOCATION, location)],
                )
            }
        });
        let (base, first) = serve(gateway).await;

        let c = PrismClient::new(endpoint(base, PASSWORD)).unwrap();
        let err = c
            .create_webhook(&spec("ours", &["VM.ON"]))
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains("redirected (307)") && shown.contains(&target),
            "{shown}"
        );
        assert!(
            !shown.contains("hook-secret") && !shown.contains(PASSWORD),
            "{shown}"
        );
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 0);
        first.abort();
        second.abort();
    }

    #[tokio::test]
    async fn a_webhook_goes_through_create_wait_update_and_delete() {
        let sim = sim().await;
        let c = client(&sim);
        assert!(c.list_webhooks().await.unwrap().is_empty());

        let uuid = c.create_webhook(&spec("ours", &["VM.ON"])).await.unwrap();
        let pending = c.get_webhook(&uuid).await.unwrap();
        assert_eq!(pending.state, "PENDING");
        let done = c
            .wait_complete(&uuid, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(done.state, "COMPLETE");
        assert_eq!(
            (
                done.name.as_str(),
                done.post_url.as_str(),
                done.spec_version
            ),
            ("ours", "http://127.0.0.1:1/hook", 0)
        );
        assert_eq!(done.events, ["VM.ON"]);
        assert_eq!(done.username.as_deref(), Some("hook-user"));
        let registered = &sim.webhooks()[0];
        let creds = registered.credentials.as_ref().unwrap();
        assert_eq!(creds.password, "hook-secret");

        let wider = spec("ours", &["VM.ON", "VM.OFF"]);
        c.update_webhook(&uuid, 0, &wider).await.unwrap();
        let updated = c
            .wait_complete(&uuid, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(updated.spec_version, 1);
        assert_eq!(updated.events, ["VM.ON", "VM.OFF"]);

        let stale = c.update_webhook(&uuid, 0, &wider).await.unwrap_err();
        assert!(stale.is_conflict(), "{stale}");
        let text = stale.to_string();
        assert!(text.starts_with(&format!(
            "prism cluster `lab`: PUT /webhooks/{uuid} failed: "
        )));
        assert!(
            text.contains("spec_version mismatch") && text.ends_with("(409)"),
            "{text}"
        );

        c.delete_webhook(&uuid).await.unwrap();
        let gone = c.get_webhook(&uuid).await.unwrap_err();
        assert!(gone.is_not_found());
        assert!(gone.to_string().contains("does not exist"), "{gone}");
        assert!(c.list_webhooks().await.unwrap().is_empty());
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn wait_complete_gives_up_after_its_timeout() {
        let sim = PrismSim::start(
            "127.0.0.1:0".parse().unwrap(),
            PrismConfig {
                pending_ms: 60_000,
                ..PrismConfig::default()
            },
        )
        .await
        .unwrap();
        let c = client(&sim);
        let uuid = c.create_webhook(&spec("slow", &["VM.ON"])).await.unwrap();
        let err = c
            .wait_complete(&uuid, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, PrismError::NotComplete { ref state, .. } if state == "PENDING"));
        assert!(err.to_string().contains(&uuid));
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn lists_are_read_to_the_last_page() {
        let sim = sim().await;
        let c = client(&sim);
        for i in 0..(WEBHOOK_PAGE + 3) {
            c.create_webhook(&spec(&format!("hook-{i:03}"), &["VM.ON"]))
                .await
                .unwrap();
        }
        let hooks = c.list_webhooks().await.unwrap();
        assert_eq!(hooks.len() as u64, WEBHOOK_PAGE + 3);
        assert_eq!(
            hooks.last().unwrap().name,
            format!("hook-{:03}", WEBHOOK_PAGE + 2)
        );
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn the_vm_inventory_is_read_as_models() {
        let sim = sim().await;
        sim.create_vm(
            NewVm::named("web-01")
                .powered_on()
                .category("AppTier", "Web")
                .nic(["10.0.0.5"]),
        )
        .await
        .unwrap();
        sim.create_vm(NewVm::named("db-01")).await.unwrap();
        let c = client(&sim);
        let vms: Vec<Vm> = c.vm_pages().try_concat().await.unwrap();
        assert_eq!(vms.len(), 2);
        let web = &vms[0];
        assert_eq!(web.name.as_deref(), Some("web-01"));
        assert_eq!(web.power_state.as_deref(), Some("ON"));
        assert_eq!(web.categories, [("AppTier".to_owned(), "Web".to_owned())]);
        assert_eq!(web.nics[0].ips, ["10.0.0.5"]);
        assert_eq!(vms[1].power_state.as_deref(), Some("OFF"));

        sim.set_faults(PrismFaults {
            legacy_payloads: true,
            ..PrismFaults::default()
        });
        let legacy: Vec<Vm> = c.vm_pages().try_concat().await.unwrap();
        assert_eq!(legacy[0].name.as_deref(), Some("web-01"));
        assert_eq!(legacy[0].power_state.as_deref(), Some("ON"));
        assert_eq!(legacy[0].nics, web.nics);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn the_vm_inventory_comes_a_page_at_a_time_and_ends_at_a_failed_page() {
        let sim = sim().await;
        for i in 0..VM_PAGE + 3 {
            sim.create_vm(NewVm::named(format!("vm-{i}")))
                .await
                .unwrap();
        }
        let c = client(&sim);
        let pages: Vec<usize> = c
            .vm_pages()
            .map_ok(|page| page.len())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(pages, [VM_PAGE as usize, 3]);

        // From the second page on, which starts where the first ended but
        // for the overlap.
        sim.set_faults(PrismFaults {
            vms_list_fails_from: Some(1),
            ..PrismFaults::default()
        });
        let items: Vec<Result<Vec<Vm>, PrismError>> = c.vm_pages().collect().await;
        assert_eq!(items.len(), 2, "the stream ends at its error");
        assert_eq!(items[0].as_ref().unwrap().len(), VM_PAGE as usize);
        let err = items[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("INTERNAL_ERROR: listing VMs from offset 449"),
            "{err}"
        );
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn an_answer_that_never_ends_is_refused_at_the_bound() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, " ".repeat(1 << 20));
            // Until the client hangs up.
            while s.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let c = PrismClient::new(endpoint(format!("http://{addr}"), PASSWORD)).unwrap();
        let err = c.auth_check().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "prism cluster `lab`: GET /users/me: unexpected answer: the answer is larger than 64 MiB"
        );
    }

    #[tokio::test]
    async fn an_unavailable_cluster_is_reported_with_its_status() {
        let sim = sim().await;
        sim.set_faults(PrismFaults {
            unavailable: true,
            ..PrismFaults::default()
        });
        let err = client(&sim).list_webhooks().await.unwrap_err();
        assert_eq!(err.status(), Some(503));
        assert_eq!(
            err.to_string(),
            "prism cluster `lab`: POST /webhooks/list failed: answered 503 Service Unavailable"
        );
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_named_with_its_host() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let c = PrismClient::new(endpoint(format!("http://{addr}"), PASSWORD)).unwrap();
        let err = c.auth_check().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PrismError::Transport { .. }), "{text}");
        assert!(
            text.starts_with(&format!(
                "prism cluster `lab`: GET /users/me: request to {addr} failed: "
            )),
            "{text}"
        );
        assert!(!text.contains(PASSWORD));
    }

    #[test]
    fn bad_endpoints_are_refused_before_any_request() {
        let err = |url: &str| {
            PrismClient::new(endpoint(url.to_owned(), PASSWORD))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("prism:9440").contains("is not a URL")
                || err("prism:9440").contains("must be https")
        );
        assert!(err("ftp://prism").contains("must be https://host:9440"));
        let with_secret = err("https://admin:hunter2@prism:9440");
        assert!(with_secret.contains("must not carry credentials"));
        assert!(!with_secret.contains("hunter2"));
        let broken = err("https://admin:hunter2@pri sm:9440");
        assert!(
            broken.contains("is not a URL") && !broken.contains("hunter2"),
            "{broken}"
        );
        let missing = PrismClient::new(ClusterEndpoint {
            tls: TlsMode::CaFile("/nonexistent/ca.pem".into()),
            ..endpoint("https://prism:9440".to_owned(), PASSWORD)
        })
        .unwrap_err()
        .to_string();
        assert!(
            missing.starts_with("prism cluster `lab`: cannot read CA file /nonexistent/ca.pem"),
            "{missing}"
        );
    }

    #[test]
    fn the_api_path_is_added_once() {
        for base in [
            "https://prism:9440",
            "https://prism:9440/",
            "https://prism:9440/api/nutanix/v3/",
        ] {
            let c = PrismClient::new(endpoint(base.to_owned(), PASSWORD)).unwrap();
            assert_eq!(c.api.path(), "/api/nutanix/v3", "{base}");
            assert_eq!(c.host, "prism:9440");
        }
        let proxied = PrismClient::new(endpoint("https://gw/lab/".to_owned(), PASSWORD)).unwrap();
        assert_eq!(proxied.api.path(), "/lab/api/nutanix/v3");
        assert_eq!(proxied.host, "gw:443");
    }

    #[test]
    fn debug_output_hides_passwords() {
        let e = endpoint("https://prism:9440".to_owned(), "s3cret-pw");
        let s = spec("x", &["VM.ON"]);
        let c = PrismClient::new(e.clone()).unwrap();
        let all = format!("{e:?} {s:?} {c:?}");
        assert!(
            !all.contains("s3cret-pw") && !all.contains("hook-secret"),
            "{all}"
        );
    }

    mod tls {
        //! Prism over TLS: a TLS front on loopback (tokio-rustls, with
        //! certificates made by rcgen) relays to the plain-HTTP simulator.

        use super::*;
        use rcgen::{BasicConstraints, CertificateParams, CertifiedKey, IsCa, KeyPair};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::net::SocketAddr;
        use std::path::PathBuf;
        use std::sync::Arc;

        /// A certificate for `names`, signed by `issuer` or self-signed.
        fn certificate(names: &[&str], issuer: Option<&CertifiedKey>) -> CertifiedKey {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let params = CertificateParams::new(names).unwrap();
            let key_pair = KeyPair::generate().unwrap();
            let cert = match issuer {
                Some(ca) => params.signed_by(&key_pair, &ca.cert, &ca.key_pair).unwrap(),
                None => params.self_signed(&key_pair).unwrap(),
            };
            CertifiedKey { cert, key_pair }
        }

        fn authority() -> CertifiedKey {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key_pair = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key_pair).unwrap();
            CertifiedKey { cert, key_pair }
        }

        /// Serve TLS with `leaf` on a new port and relay to `upstream`.
        async fn tls_front(upstream: SocketAddr, leaf: &CertifiedKey) -> SocketAddr {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pair.serialize_der()));
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.cert.der().clone()], key)
            .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            });
            addr
        }

        fn write(dir: &tempfile::TempDir, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        async fn check(front: SocketAddr, tls: TlsMode) -> Result<String, PrismError> {
            let c = PrismClient::new(ClusterEndpoint {
                tls,
                ..endpoint(format!("https://{front}"), PASSWORD)
            })?;
            c.auth_check().await
        }

        #[tokio::test]
        async fn a_ca_file_trusts_servers_of_that_ca_only() {
            let sim = sim().await;
            let files = tempfile::tempdir().unwrap();
            let ca = authority();
            let front = tls_front(sim.addr(), &certificate(&["127.0.0.1"], Some(&ca))).await;
            let ca_file = write(&files, "ca.pem", ca.cert.pem());
            assert_eq!(
                check(front, TlsMode::CaFile(ca_file)).await.unwrap(),
                "admin"
            );

            let other = write(&files, "other.pem", authority().cert.pem());
            let err = check(front, TlsMode::CaFile(other)).await.unwrap_err();
            assert!(matches!(err, PrismError::Transport { .. }), "{err}");
            assert!(err.to_string().contains("certificate"), "{err}");
            sim.shutdown().await;
        }

        #[tokio::test]
        async fn a_pinned_certificate_is_accepted_whatever_its_names_and_nothing_else_is() {
            let sim = sim().await;
            let files = tempfile::tempdir().unwrap();
            // Issued for a name the client does not connect to, as Prism's
            // self-signed certificates often are.
            let leaf = certificate(&["prism.invalid"], None);
            let front = tls_front(sim.addr(), &leaf).await;
            let pem = write(&files, "pin.pem", leaf.cert.pem());
            let der = write(&files, "pin.der", leaf.cert.der().as_ref());
            assert_eq!(
                check(front, TlsMode::PinnedCert(pem)).await.unwrap(),
                "admin"
            );
            assert_eq!(
                check(front, TlsMode::PinnedCert(der)).await.unwrap(),
                "admin"
            );

            let stranger = write(
                &files,
                "stranger.pem",
                certificate(&["prism.invalid"], None).cert.pem(),
            );
            let err = check(front, TlsMode::PinnedCert(stranger))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("not the pinned one"), "{err}");
            sim.shutdown().await;
        }

        #[tokio::test]
        async fn a_self_signed_server_is_refused_by_default_and_accepted_only_when_insecure() {
            let sim = sim().await;
            let front = tls_front(sim.addr(), &certificate(&["127.0.0.1"], None)).await;
            let err = check(front, TlsMode::System).await.unwrap_err();
            assert!(err.to_string().contains("certificate"), "{err}");
            assert_eq!(check(front, TlsMode::Insecure).await.unwrap(), "admin");
            sim.shutdown().await;
        }
    }
}
