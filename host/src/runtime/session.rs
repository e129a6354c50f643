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

use std::time::{Duration, Instant};

use prismhook_core::policy::{Login, LoginSend, TokenAt};
use prismhook_core::secret::Secret;

use crate::outbound::{read_body, BodyError};

/// Largest sign-in answer read.
const MAX_ANSWER_BYTES: u64 = 1 << 20;
/// A sign-in gets at most this long, whatever is left of the call.
const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(30);

/// The current token of each of a plugin's logins (by index in its
/// policy), shared by all its calls.
#[derive(Debug, Default)]
pub struct Sessions(Vec<tokio::sync::Mutex<Option<Token>>>);

#[derive(Debug, Clone)]
struct Token {
    value: Secret,
    obtained: Instant,
}

/// Why no token could be had; says what failed, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("signing in to {url} failed: {reason}")]
    Refused { url: String, reason: String },
    #[error("signing in to {url} failed: {reason}")]
    Unreachable { url: String, reason: String },
}

impl Sessions {
    pub fn new(logins: usize) -> Sessions {
        Sessions((0..logins).map(|_| tokio::sync::Mutex::new(None)).collect())
    }

    /// The token to send with login `index`'s requests: the cached one
    /// while its lifetime lasts and the origin has not `refused` it, else a
    /// fresh sign-in (then `true`). Concurrent callers wait for one
    /// sign-in and share it.
    pub async fn token(
        &self,
        index: usize,
        login: &Login,
        client: &reqwest::Client,
        refused: Option<&Secret>,
        time_left: Duration,
    ) -> Result<(Secret, bool), SignInError> {
        let Some(slot) = self.0.get(index) else {
            return Err(SignInError::Refused {
                url: shown(&login.url),
                reason: "no such login".into(),
            });
        };
        let mut slot = slot.lock().await;
        if let Some(token) = slot.as_ref() {
            let expired = login
                .lifetime
                .is_some_and(|life| token.obtained.elapsed() >= life);
            let was_refused = refused.is_some_and(|r| r.expose() == token.value.expose());
            if !expired && !was_refused {
                return Ok((token.value.clone(), false));
            }
        }
        *slot = None;
        let value = sign_in(login, client, time_left.min(SIGN_IN_TIMEOUT)).await?;
        *slot = Some(Token {
            value: value.clone(),
            obtained: Instant::now(),
        });
        Ok((value, true))
    }

    /// Every token held now, for scrubbing echoes out of answers.
    pub fn current(&self) -> Vec<Secret> {
        self.0
            .iter()
            .filter_map(|slot| slot.try_lock().ok()?.as_ref().map(|t| t.value.clone()))
            .collect()
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
    use super::xml_text;

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
