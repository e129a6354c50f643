//! `prismhook:plugin/http`: outbound requests under the plugin's policy.
//!
//! Every hop (the request and each redirect) is checked against the
//! allowlist before anything is sent; credentials are added per hop for the
//! hop's own origin only; the response is size-capped and scrubbed of any
//! injected secret before the plugin sees it. Denials are error values for
//! the guest, never traps.

use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method};
use url::Url;

use prismhook_core::policy::Login;
use prismhook_core::secret::Secret;

use crate::outbound::{read_body, BodyError};
use crate::runtime::bindings::http::{Error, Host, Request, Response};
use crate::runtime::scrub::Scrubber;
use crate::runtime::session::SignInError;
use crate::runtime::state::{HostState, PluginIdentity};

/// Headers that frame the message or steer the connection: hyper's to set
/// from the body it sends. A plugin's `Content-Length` on a request without
/// a body would leave the pooled connection expecting bytes that never come,
/// and the next request on it, maybe another plugin's, would be read as
/// this one's body (and its own body as a request of the plugin's making).
const HOST_FRAMED: [http::HeaderName; 9] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::UPGRADE,
    http::header::TRAILER,
    http::header::EXPECT,
    http::header::PROXY_AUTHORIZATION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

const MAX_REDIRECTS: usize = 5;
/// Ceiling for one request, whatever the plugin asks for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Host for HostState {
    async fn send(&mut self, request: Request) -> wasmtime::Result<Result<Response, Error>> {
        let started = Instant::now();
        let plugin = self.plugin.name.clone();
        // Logged: the plugin's text only once it is known to be a method.
        let method = method_of(&request.method).map_or_else(|| "-".to_owned(), |m| m.to_string());
        // Series are per allowlist rule: a rule for many origins (a
        // wildcard, a network, any port) is one series, not one per origin
        // the plugin or a redirect picks.
        let identity = self.plugin.clone();
        let label = |url: &Url| {
            identity
                .policy
                .rule_for(url)
                .map_or_else(|| "-".to_owned(), |rule| rule.as_str().to_owned())
        };
        let asked = Url::parse(&request.url).map_or_else(|_| "-".into(), |u| label(&u));
        let mut tokens = Vec::new();
        let result = self.send_checked(request, &mut tokens).await;
        // Every secret the request could carry: the injected ones, the
        // login passwords, and the session tokens held or just used.
        tokens.extend(self.plugin.sessions.current());
        let scrubber = Scrubber::new(self.plugin.policy.secrets().chain(&tokens));
        // Error messages can quote what a server sent (a redirect's
        // `Location`): they are scrubbed like responses, before they are
        // logged or handed to the plugin.
        let result = match result {
            Ok((url, mut response)) => {
                scrub_response(&mut response, &scrubber);
                Ok((url, response))
            }
            Err(e) => Err(scrub_error(e, &scrubber)),
        };
        let (origin, outcome) = match &result {
            Ok((url, resp)) => (label(url), resp.status.to_string()),
            // A plugin may ask for any number of origins off its allowlist
            // (and, past its request budget, before the allowlist is
            // consulted); they must not each become a metrics series.
            Err(e @ (Error::Denied(_) | Error::InvalidRequest(_) | Error::LimitExceeded(_))) => {
                ("-".to_owned(), error_kind(e).to_owned())
            }
            Err(e) => (asked, error_kind(e).to_owned()),
        };
        self.outbound.count(&plugin, origin, outcome);
        match &result {
            // Where the redirects ended is the server's text: a `Location`
            // can carry an injected secret, so it is scrubbed as the answer is.
            Ok((url, resp)) => tracing::debug!(
                %plugin, events = %self.context, %method,
                origin = %scrubber.scrub_str(&url.origin().ascii_serialization()),
                path = %scrubber.scrub_str(url.path()), status = resp.status,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "plugin http request"
            ),
            Err(Error::Denied(why)) => {
                tracing::warn!(%plugin, events = %self.context, %method, "plugin http request denied: {why}")
            }
            Err(e) => {
                tracing::debug!(%plugin, events = %self.context, %method, "plugin http request failed: {e:?}")
            }
        }
        Ok(result.map(|(_, r)| r))
    }
}

/// The methods the WIT names. Others are refused: `TRACE` has a server echo
/// the request, injected headers and all; `CONNECT` opens a tunnel.
const METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::HEAD,
];

/// The method a plugin names, in any case, if it is one of [`METHODS`].
fn method_of(name: &str) -> Option<Method> {
    METHODS
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(name))
}

/// The metrics label of a failed request.
fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Denied(_) => "denied",
        Error::InvalidRequest(_) => "invalid-request",
        Error::Timeout => "timeout",
        Error::ConnectionFailed(_) => "connection-failed",
        Error::TooLarge(_) => "too-large",
        Error::LimitExceeded(_) => "limit-exceeded",
        Error::Other(_) => "other",
    }
}

impl HostState {
    /// Sends `request` under the plugin's policy. The session tokens sent
    /// go into `tokens`, for the caller to scrub from the answer.
    async fn send_checked(
        &mut self,
        request: Request,
        tokens: &mut Vec<Secret>,
    ) -> Result<(Url, Response), Error> {
        let limits = self.plugin.limits;
        if self.requests_made >= self.max_requests {
            return Err(Error::LimitExceeded(format!(
                "at most {} requests per call",
                self.max_requests
            )));
        }
        self.requests_made += 1;

        let mut method = method_of(&request.method).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "method `{}` is not one of {}",
                prismhook_core::text::truncate(request.method.clone(), 40),
                METHODS.map(|m| m.to_string()).join(", ")
            ))
        })?;
        let mut url =
            Url::parse(&request.url).map_err(|e| Error::InvalidRequest(format!("bad url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidRequest(format!(
                "scheme `{}` is not http or https",
                url.scheme()
            )));
        }
        let mut headers = http::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::InvalidRequest(format!("bad header name `{name}`")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| Error::InvalidRequest(format!("bad value for header `{name}`")))?;
            // The plugin may neither set nor override what the host injects,
            // nor ask for an answer the scrubber cannot read whole: a
            // compressed one, or a part of one that may cut a secret in two.
            let unscrubbable = name == http::header::ACCEPT_ENCODING
                || name == http::header::TE
                || name == http::header::RANGE
                || name == http::header::IF_RANGE;
            if !self.plugin.policy.is_injected_name(&name)
                && name != http::header::HOST
                && !unscrubbable
                && !HOST_FRAMED.contains(&name)
            {
                headers.append(name, value);
            }
        }
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let mut body = request.body;

        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = request
            .timeout_ms
            .map_or(MAX_REQUEST_TIMEOUT, |ms| Duration::from_millis(ms.into()))
            .min(MAX_REQUEST_TIMEOUT)
            .min(remaining);
        let deadline = Instant::now() + timeout;

        let (client, identity, context, proxied) = (
            self.http.clone(),
            self.plugin.clone(),
            self.context.clone(),
            self.proxy_from_env,
        );
        for _hop in 0..=MAX_REDIRECTS {
            // reqwest would send them as `Authorization`, beside (not
            // instead of) an injected one, and a server may take the first.
            if !url.username().is_empty() || url.password().is_some() {
                return Err(Error::InvalidRequest(format!(
                    "{} carries a user name or password; credentials are the host's to add",
                    url.origin().ascii_serialization()
                )));
            }
            if !self.plugin.policy.allows(&url) {
                return Err(Error::Denied(format!(
                    "{} is not on plugin `{}`'s outbound allowlist",
                    url.origin().ascii_serialization(),
                    self.plugin.name
                )));
            }
            // A proxy resolves the names of `https://` requests itself,
            // past the host's resolver: the same rule, applied first.
            if let (true, "https", Some(url::Host::Domain(name))) =
                (proxied, url.scheme(), url.host())
            {
                match tokio::time::timeout_at(
                    deadline.into(),
                    crate::outbound::refuse_local_name(name),
                )
                .await
                {
                    Ok(checked) => checked.map_err(Error::Denied)?,
                    Err(_) => return Err(Error::Timeout),
                }
            }
            let hop = Hop {
                client: &client,
                plugin: &identity,
                context: &context,
                method: &method,
                url: &url,
                headers: &headers,
                body: &body,
                deadline,
            };
            let login = identity.policy.login_for(&url);
            let mut session = match login {
                Some((index, login)) => Some(hop.session_token(index, login, None).await?),
                None => None,
            };
            let mut resp = hop.send(session.as_ref()).await?;
            // An expired or revoked token: sign in again, once, and resend;
            // unless the token was itself signed in for moments ago after a
            // refusal (a 403 for what the account may not do), when the
            // answer stands.
            if let (Some((index, login)), Some(refused)) = (login, &session) {
                if matches!(resp.status().as_u16(), 401 | 403) {
                    tokens.push(refused.clone());
                    let next = hop.session_token(index, login, Some(refused)).await?;
                    if next.expose() != refused.expose() {
                        resp = hop.send(Some(&next)).await?;
                    }
                    session = Some(next);
                }
            }
            tokens.extend(session);
            let status = resp.status();
            if status.is_redirection() {
                if let Some(location) = resp.headers().get(http::header::LOCATION) {
                    let next = location
                        .to_str()
                        .ok()
                        .and_then(|l| url.join(l).ok())
                        .ok_or_else(|| Error::Other("redirect with an unusable Location".into()))?;
                    // 303 (and, as browsers do, 301/302 after POST) turn into
                    // GET, without the body or the headers that described it.
                    if status == http::StatusCode::SEE_OTHER
                        || (matches!(status.as_u16(), 301 | 302) && method == Method::POST)
                    {
                        method = Method::GET;
                        body = None;
                        for name in [
                            http::header::CONTENT_LENGTH,
                            http::header::CONTENT_TYPE,
                            http::header::CONTENT_ENCODING,
                            http::header::TRANSFER_ENCODING,
                        ] {
                            headers.remove(name);
                        }
                    }
                    url = next;
                    continue;
                }
            }
            // Every `Content-Encoding` line: a second one would apply too.
            if let Some(coding) = resp
                .headers()
                .get_all(http::header::CONTENT_ENCODING)
                .iter()
                .find(|c| !c.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                return Err(Error::Other(format!(
                    "the answer is encoded (`{}`) although the host asked for none: \
                     the host cannot keep injected secrets out of it",
                    prismhook_core::text::truncate(
                        String::from_utf8_lossy(coding.as_bytes()).into_owned(),
                        40
                    )
                )));
            }
            let resp_headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            let body = read_capped(resp, limits.max_response_bytes).await?;
            let response = Response {
                status: status.as_u16(),
                headers: resp_headers,
                body,
            };
            return Ok((url, response));
        }
        Err(Error::Other(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// One request of a call to one URL (the first, or a redirect's).
struct Hop<'a> {
    client: &'a reqwest::Client,
    plugin: &'a PluginIdentity,
    /// The call's event ids, for log lines.
    context: &'a str,
    method: &'a Method,
    url: &'a Url,
    headers: &'a http::HeaderMap,
    body: &'a Option<Vec<u8>>,
    deadline: Instant,
}

impl Hop<'_> {
    /// Sends it with the credentials injected for its origin: static
    /// headers, and `session` in its login's header.
    async fn send(&self, session: Option<&Secret>) -> Result<reqwest::Response, Error> {
        let mut req = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .timeout(self.deadline.saturating_duration_since(Instant::now()));
        for injected in self.plugin.policy.headers_for(self.url) {
            req = req.header(injected.name.clone(), sensitive(injected.value.expose())?);
        }
        if let (Some((_, login)), Some(token)) = (self.plugin.policy.login_for(self.url), session) {
            let value = sensitive(&format!("{}{}", login.prefix, token.expose()))?;
            req = req.header(login.header.clone(), value);
        }
        if let Some(b) = self.body {
            req = req.body(b.clone());
        }
        req.send().await.map_err(classify)
    }

    /// The session token for login `index` (see `runtime::session`).
    async fn session_token(
        &self,
        index: usize,
        login: &Login,
        refused: Option<&Secret>,
    ) -> Result<Secret, Error> {
        let (token, fresh) = self
            .plugin
            .sessions
            .token(index, login, self.client, refused, self.deadline)
            .await
            .map_err(|e| {
                tracing::warn!(plugin = %self.plugin.name, events = %self.context, "{e}");
                let unreachable = match &e {
                    SignInError::Waiting { last, .. } => {
                        matches!(**last, SignInError::Unreachable { .. })
                    }
                    e => matches!(e, SignInError::Unreachable { .. }),
                };
                if unreachable {
                    Error::ConnectionFailed(e.to_string())
                } else {
                    Error::Other(e.to_string())
                }
            })?;
        if fresh {
            // The origin only: a login URL's query may hold a credential.
            let why = if refused.is_some() {
                "the origin refused the last token"
            } else {
                "no token held"
            };
            tracing::info!(plugin = %self.plugin.name, events = %self.context, origin = login.origin.as_str(), "signed in for a session token ({why})");
        }
        Ok(token)
    }
}

/// A credential as a header value that is never logged.
fn sensitive(value: &str) -> Result<HeaderValue, Error> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| Error::Other("an injected credential is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Replaces every injected secret echoed back by the server, in any common
/// encoding, so a plugin cannot read a credential through an echo.
fn scrub_response(response: &mut Response, scrubber: &Scrubber) {
    for (_, v) in response.headers.iter_mut() {
        *v = scrubber.scrub_str(v);
    }
    if let Some(body) = scrubber.scrub(&response.body) {
        response.body = body;
    }
}

fn scrub_error(e: Error, s: &Scrubber) -> Error {
    match e {
        Error::Denied(m) => Error::Denied(s.scrub_str(&m)),
        Error::InvalidRequest(m) => Error::InvalidRequest(s.scrub_str(&m)),
        Error::ConnectionFailed(m) => Error::ConnectionFailed(s.scrub_str(&m)),
        Error::LimitExceeded(m) => Error::LimitExceeded(s.scrub_str(&m)),
        Error::Other(m) => Error::Other(s.scrub_str(&m)),
        e @ (Error::Timeout | Error::TooLarge(_)) => e,
    }
}

async fn read_capped(resp: reqwest::Response, max: u64) -> Result<Vec<u8>, Error> {
    read_body(resp, max).await.map_err(|e| match e {
        BodyError::TooLarge => Error::TooLarge(max),
        BodyError::Transport(e) => classify(e),
    })
}

/// reqwest's top-level message is vague ("error sending request"); the
/// cause chain says what actually happened.
fn classify(e: reqwest::Error) -> Error {
    use prismhook_core::text::error_chain;
    if e.is_timeout() {
        Error::Timeout
    } else if e.is_connect() {
        Error::ConnectionFailed(error_chain(&e))
    } else {
        Error::Other(error_chain(&e))
    }
}
