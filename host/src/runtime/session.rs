//! Session logins for plugins' origins (`[[plugin.NAME.login]]`).
//!
//! Most network managers (BIG-IP with remote authentication, PAN-OS
//! keygen, Cisco FMC, FortiManager) hand out a token at sign-in that
//! expires. The host signs in with the operator's username and password,
//! keeps the token per plugin and origin, adds it to that origin's
//! requests, and signs in again when its `lifetime` is over or the origin
//! answers 401 or 403. One sign-in serves every concurrent call: BIG-IP
//! refuses a user's 101st live token, so signing in per call would lock the
//! account out. The plugin never sees the password or the token.
//!
//! For the same reason sign-ins are rationed: a token that itself replaced
//! a refused one is not replaced for a refusal before it is
//! [`MIN_TOKEN_AGE`] old (a 403 is as often "not allowed" as "expired": a
//! plugin asking for what its role may not have would otherwise sign in
//! for every request), and a
//! sign-in that failed is not tried again before a wait that doubles with
//! each failure in a row (a wrong password must not lock the account out
//! through the directory behind the login). Tokens replaced stay known for
//! scrubbing: the origin may still honour them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prismhook_core::policy::{Login, LoginSend, TokenAt};
use prismhook_core::secret::Secret;

use crate::clock::doubled;
use crate::outbound::{read_body, BodyError};

/// Largest sign-in answer read.
const MAX_ANSWER_BYTES: u64 = 1 << 20;
/// A sign-in gets at most this long, whatever is left of the call.
const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(30);
/// A token that replaced a refused one is replaced for a refusal only once
/// it is this old.
pub const MIN_TOKEN_AGE: Duration = Duration::from_secs(30);
/// The wait after a failed sign-in, doubled with each failure in a row.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Tokens of one login kept for scrubbing: the current one and those it
/// replaced.
const TOKENS_KEPT: usize = 16;

/// The current token of each of a plugin's logins (by index in its
/// policy), shared by all its calls.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Vec<tokio::sync::Mutex<Slot>>,
    /// Each login's latest tokens, newest last, readable without waiting
    /// for a sign-in under way.
    known: Mutex<Vec<VecDeque<Secret>>>,
}

#[derive(Debug, Default)]
struct Slot {
    token: Option<Token>,
    failed: Option<Failed>,
}

#[derive(Debug, Clone)]
struct Token {
    value: Secret,
    obtained: Instant,
    /// Signed in for because the origin refused the token before it.
    after_refusal: bool,
}

/// The last sign-ins failed: none is tried before `until`.
#[derive(Debug)]
struct Failed {
    error: SignInError,
    in_a_row: u32,
    until: Instant,
}

/// Why no token could be had; says what failed, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignInError {
    #[error("signing in to {url} failed: {reason}")]
    Refused { url: String, reason: String },
    #[error("signing in to {url} failed: {reason}")]
    Unreachable { url: String, reason: String },
    /// A sign-in failed a moment ago; the next waits until `after`.
    #[error("{last}; not tried again for {wait:?}")]
    Waiting {
        last: Box<SignInError>,
        wait: Duration,
    },
}

impl Sessions {
    pub fn new(logins: usize) -> Sessions {
        Sessions {
            slots: (0..logins).map(|_| Default::default()).collect(),
            known: Mutex::new(vec![VecDeque::new(); logins]),
        }
    }

    /// The token to send with login `index`'s requests: the cached one
    /// while its lifetime lasts and the origin has not `refused` it (or it
    /// replaced a refused one less than [`MIN_TOKEN_AGE`] ago), else a
    /// fresh sign-in (then
    /// `true`), unless one failed too recently. Concurrent callers wait for
    /// one sign-in and share it, until `deadline`.
    pub async fn token(
        &self,
        index: usize,
        login: &Login,
        client: &reqwest::Client,
        refused: Option<&Secret>,
        deadline: Instant,
    ) -> Result<(Secret, bool), SignInError> {
        let url = || shown(&login.url);
        let Some(slot) = self.slots.get(index) else {
            return Err(SignInError::Refused {
                url: url(),
                reason: "no such login".into(),
            });
        };
        let time_left = || deadline.saturating_duration_since(Instant::now());
        let mut slot = tokio::time::timeout(time_left(), slot.lock())
            .await
            .map_err(|_| SignInError::Unreachable {
                url: url(),
                reason: "another call's sign-in did not end within this call's time".into(),
            })?;
        if let Some(token) = &slot.token {
            let expired = login
                .lifetime
                .is_some_and(|life| token.obtained.elapsed() >= life);
            let was_refused = refused.is_some_and(|r| r.expose() == token.value.expose())
                && (!token.after_refusal || token.obtained.elapsed() >= MIN_TOKEN_AGE);
            if !expired && !was_refused {
                return Ok((token.value.clone(), false));
            }
        }
        if let Some(failed) = &slot.failed {
            let wait = failed.until.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                return Err(SignInError::Waiting {
                    last: Box::new(failed.error.clone()),
                    wait,
                });
            }
        }
        slot.token = None;
        match sign_in(login, client, time_left().min(SIGN_IN_TIMEOUT)).await {
            Ok(value) => {
                slot.failed = None;
                slot.token = Some(Token {
                    value: value.clone(),
                    obtained: Instant::now(),
                    after_refusal: refused.is_some(),
                });
                self.keep(index, value.clone());
                Ok((value, true))
            }
            Err(error) => {
                let in_a_row = slot.failed.as_ref().map_or(0, |f| f.in_a_row + 1);
                slot.failed = Some(Failed {
                    error: error.clone(),
                    in_a_row,
                    until: Instant::now() + doubled(FIRST_WAIT, in_a_row, MAX_WAIT),
                });
                Err(error)
            }
        }
    }

    fn keep(&self, index: usize, token: Secret) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tokens) = known.get_mut(index) {
            if tokens.len() >= TOKENS_KEPT {
                tokens.pop_front();
            }
            tokens.push_back(token);
        }
    }

    /// Every token held now, and the last ones they replaced, for
    /// scrubbing echoes out of answers.
    pub fn current(&self) -> Vec<Secret> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.iter().flatten().cloned().collect()
    }
}

/// A login URL as errors and logs show it: without its query and fragment,
/// which may hold a credential (an API key as a parameter).
fn shown(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

async fn sign_in(
    login: &Login,
    client: &reqwest::Client,
    timeout: Duration,
) -> Result<Secret, SignInError> {
    let url = shown(&login.url);
    let refused = |reason: String| SignInError::Refused {
        url: url.clone(),
        reason,
    };
    let mut req = client.post(login.url.clone()).timeout(timeout);
    let mut fields: Vec<(&str, &str)> = vec![
        (&login.username_field, &login.username),
        (&login.password_field, login.password.expose()),
    ];
    fields.extend(login.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    req = match login.send {
        LoginSend::Json => {
            let body: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                .collect();
            req.json(&body)
        }
        LoginSend::Form => req.form(&fields),
        LoginSend::Basic => {
            let req = req.basic_auth(&login.username, Some(login.password.expose()));
            match &fields[2..] {
                [] => req,
                extra => req.form(extra),
            }
        }
    };
    let resp = req.send().await.map_err(|e| SignInError::Unreachable {
        url: url.clone(),
        reason: if e.is_timeout() {
            "no answer in time".into()
        } else {
            "cannot connect".into()
        },
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(refused(format!("HTTP {}", status.as_u16())));
    }
    let from_header = match &login.token {
        TokenAt::Header(name) => Some(
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| refused(format!("the answer has no `{name}` header")))?,
        ),
        _ => None,
    };
    let body = read_bounded(resp).await.map_err(refused)?;
    let token = match (&login.token, from_header) {
        (_, Some(token)) => token,
        (TokenAt::JsonPointer(pointer), None) => {
            let json: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| refused("the answer is not JSON".into()))?;
            match json.pointer(pointer) {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => return Err(refused(format!("the answer has no string at `{pointer}`"))),
            }
        }
        (TokenAt::XmlPath(path), None) => xml_text(&body, path).ok_or_else(|| {
            refused(format!(
                "the answer has no element `/{}` with text",
                path.join("/")
            ))
        })?,
        (TokenAt::Header(_), None) => unreachable!("read above"),
    };
    let usable = !token.is_empty()
        && http::HeaderValue::from_str(&format!("{}{token}", login.prefix)).is_ok();
    if !usable {
        return Err(refused(
            "the token is empty or not a valid header value".into(),
        ));
    }
    Ok(Secret::new(token))
}

async fn read_bounded(resp: reqwest::Response) -> Result<Vec<u8>, String> {
    read_body(resp, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
            BodyError::Transport(_) => "the answer was cut off".to_owned(),
        })
}

/// The text of the first element at `path` (names from the root down).
fn xml_text(body: &[u8], path: &[String]) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut buf = Vec::new();
    let mut text = String::new();
    let at_path = |stack: &[Vec<u8>]| {
        stack.len() == path.len() && stack.iter().zip(path).all(|(a, b)| a == b.as_bytes())
    };
    loop {
        match reader.read_event_into(&mut buf).ok()? {
            Event::Start(e) => {
                stack.push(e.name().as_ref().to_vec());
                // Nesting beyond the path cannot hold the token.
                if stack.len() > path.len() + 1 {
                    return None;
                }
            }
            Event::End(_) => {
                if at_path(&stack) {
                    let text = text.trim();
                    return (!text.is_empty()).then(|| text.to_owned());
                }
                stack.pop();
            }
            Event::Text(t) if at_path(&stack) => text.push_str(&t.decode().ok()?),
            Event::CData(t) if at_path(&stack) => {
                text.push_str(std::str::from_utf8(&t).ok()?);
            }
            Event::Eof => return None,
            _ => {}
        }
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A login URL that counts sign-ins and answers token `t<n>`, or 401
    /// when `refuse` is set.
    async fn login_server(refuse: bool) -> (Login, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/login",
            axum::routing::post(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if refuse {
                        return (http::StatusCode::UNAUTHORIZED, String::new());
                    }
                    let token = serde_json::json!({ "token": { "token": format!("t{n}") } });
                    (http::StatusCode::OK, token.to_string())
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
        let login = Login {
            origin: prismhook_core::policy::OriginRule::parse(&base).unwrap(),
            url: format!("{base}/login").parse().unwrap(),
            send: LoginSend::Json,
            username: "svc".into(),
            password: Secret::new("pw-never-seen"),
            username_field: "username".into(),
            password_field: "password".into(),
            fields: Vec::new(),
            token: TokenAt::JsonPointer("/token/token".into()),
            header: http::HeaderName::from_static("x-auth"),
            prefix: String::new(),
            lifetime: None,
        };
        (login, hits)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_failed_sign_in_is_not_tried_again_before_its_wait_is_over() {
        let (login, hits) = login_server(true).await;
        let (sessions, client) = (Sessions::new(1), reqwest::Client::new());
        let first = sessions.token(0, &login, &client, None, soon()).await;
        assert!(
            matches!(first, Err(SignInError::Refused { .. })),
            "{first:?}"
        );
        let second = sessions.token(0, &login, &client, None, soon()).await;
        let Err(SignInError::Waiting { last, wait }) = second else {
            panic!("{second:?}");
        };
        assert!(last.to_string().contains("failed: HTTP 401"), "{last}");
        assert!(wait <= FIRST_WAIT);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "no second sign-in");
    }

    #[tokio::test]
    async fn a_token_that_replaced_a_refused_one_is_not_replaced_at_once_and_both_stay_scrubbed() {
        let (login, hits) = login_server(false).await;
        let (sessions, client) = (Sessions::new(1), reqwest::Client::new());
        let t = |s: &str| Secret::new(s);
        let (t1, fresh) = sessions
            .token(0, &login, &client, None, soon())
            .await
            .unwrap();
        assert_eq!((t1.expose(), fresh), ("t1", true));
        // Refused (expired on the origin's side): signed in again.
        let (t2, fresh) = sessions
            .token(0, &login, &client, Some(&t1), soon())
            .await
            .unwrap();
        assert_eq!((t2.expose(), fresh), ("t2", true));
        // Refused at once too: a 403 for what the account may not do.
        let (kept, fresh) = sessions
            .token(0, &login, &client, Some(&t2), soon())
            .await
            .unwrap();
        assert_eq!((kept.expose(), fresh), ("t2", false));
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        let known: Vec<String> = sessions
            .current()
            .iter()
            .map(|s| s.expose().to_owned())
            .collect();
        assert_eq!(known, [t("t1").expose(), t("t2").expose()]);
    }

    fn path(p: &str) -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_token_is_read_from_the_element_at_its_path_only() {
        let keygen =
            br#"<response status="success"><result><key>LUFRPT1abc==</key></result></response>"#;
        assert_eq!(
            xml_text(keygen, &path("/response/result/key")).as_deref(),
            Some("LUFRPT1abc==")
        );
        let elsewhere = br#"<response><msg><key>not-this</key></msg><result><key> k2 </key></result></response>"#;
        assert_eq!(
            xml_text(elsewhere, &path("/response/result/key")).as_deref(),
            Some("k2")
        );
        let error = br#"<response status="error"><result><msg>Invalid credentials.</msg></result></response>"#;
        assert_eq!(xml_text(error, &path("/response/result/key")), None);
        assert_eq!(
            xml_text(b"not xml <<<", &path("/response/result/key")),
            None
        );
    }
}
