//! The two conversations with the firewall: sending a diff as User-ID
//! messages, and reading back every registered IP.
//!
//! Requests carry no credentials: the host adds `X-PAN-KEY` for the
//! firewall's origin, so the key never enters plugin memory, logs or URLs.

use std::collections::BTreeSet;

use crate::config::Config;
use crate::host::{Host, HttpError, Level, Request, Response};
use crate::response::{self, Failure};
use crate::state::Diff;
use crate::tags::{self, IpTags};
use crate::uid::{self, Message};

/// 10,000 pages of 500 entries: far beyond any firewall's User-ID capacity,
/// so hitting it means the firewall ignores `start-point`.
const MAX_PAGES: usize = 10_000;

fn post(config: &Config, host: &mut impl Host, body: String) -> Result<Response, Failure> {
    let request = Request {
        method: "POST".to_owned(),
        url: config.api_url(),
        headers: vec![(
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        )],
        body: body.into_bytes(),
    };
    host.send(request).map_err(|error| match error {
        HttpError::Denied(why) => Failure::Reject(format!(
            "the host's policy does not allow calling the firewall: {why}"
        )),
        HttpError::InvalidRequest(why) => {
            Failure::Reject(format!("the host refused the request as malformed: {why}"))
        }
        HttpError::Timeout => Failure::retry("the firewall did not answer in time"),
        HttpError::ConnectionFailed(why) => {
            Failure::retry(format!("could not connect to the firewall: {why}"))
        }
        HttpError::TooLarge(limit) => Failure::retry(format!(
            "the firewall's answer exceeded the host's {limit}-byte limit"
        )),
        HttpError::LimitExceeded(why) => {
            Failure::retry(format!("too many requests in one call: {why}"))
        }
        HttpError::Other(why) => Failure::retry(format!("request to the firewall failed: {why}")),
    })
}

/// Sends a diff, split only where its size requires. Stops at the first
/// failure; messages already accepted are harmless to send again.
pub fn send_diff(config: &Config, host: &mut impl Host, diff: &Diff) -> Result<(), Failure> {
    let messages = uid::split(config, diff);
    let total = messages.len();
    for (index, message) in messages.iter().enumerate() {
        let body = uid::uid_body(config, message);
        host.log(
            Level::Debug,
            &format!(
                "uid-message {}/{total}: {} register and {} unregister entries, {} bytes",
                index + 1,
                message.register.len(),
                message.unregister.len(),
                body.len()
            ),
        );
        let answer = post(config, host, body)?;
        response::check(&answer)?;
    }
    Ok(())
}

/// Requests a send may spend finding the entries a refused message carries:
/// enough to single out a few IPs in the largest message (two per halving,
/// about thirteen halvings of 5,000 IPs each), not a request per IP of a
/// message refused for something every IP in it shares.
const MAX_ISOLATING_REQUESTS: usize = 96;

/// IPs the firewall refused, each with its answer.
pub type Refused = Vec<(String, String)>;

/// Sends a diff as [`send_diff`] does, except that a message the firewall
/// refuses is cut in two by IP and each half sent again, down to a single
/// IP, so that an entry the firewall will never take does not hold back
/// the others. A failure that may pass (the firewall down, busy) still
/// stops the send, as does a refusal that no one IP explains: the
/// platform's registered-IP limit, every IP of a diff of several refused,
/// or more refused than [`MAX_ISOLATING_REQUESTS`] can single out.
pub fn send_diff_around_refusals(
    config: &Config,
    host: &mut impl Host,
    diff: &Diff,
) -> Result<Refused, Failure> {
    let mut refused = Refused::new();
    let mut isolating = 0;
    let mut accepted = false;
    let mut queue: Vec<Message> = uid::split(config, diff);
    queue.reverse();
    while let Some(message) = queue.pop() {
        let answer = post(config, host, uid::uid_body(config, &message))?;
        let reason = match response::check(&answer) {
            Ok(()) => {
                accepted = true;
                continue;
            }
            Err(Failure::Reject(reason)) if !reason.contains(response::REGISTERED_IP_LIMIT) => {
                reason
            }
            Err(failure) => return Err(failure),
        };
        match halves(&message) {
            None => {
                let ip = message.unregister.iter().chain(&message.register);
                let ip = ip.map(|(ip, _)| *ip).next().unwrap_or_default();
                refused.push((ip.to_owned(), reason));
            }
            Some(_) if isolating + 2 > MAX_ISOLATING_REQUESTS => {
                return Err(Failure::Reject(reason));
            }
            Some((first, second)) => {
                isolating += 2;
                queue.push(second);
                queue.push(first);
            }
        }
    }
    // A firewall that takes none of several IPs refuses something they
    // share (a vsys it does not have, a tag it will not take), not each IP.
    if !accepted && refused.len() > 1 {
        return Err(Failure::Reject(format!(
            "the firewall refused every one of the {} IPs it was sent: {}",
            refused.len(),
            refused[0].1
        )));
    }
    Ok(refused)
}

/// A message cut in two by its IPs, each IP's entries in one half; `None`
/// for a message of one IP.
fn halves<'a>(message: &Message<'a>) -> Option<(Message<'a>, Message<'a>)> {
    let mut seen = BTreeSet::new();
    let ips: Vec<&str> = message
        .unregister
        .iter()
        .chain(&message.register)
        .map(|(ip, _)| *ip)
        .filter(|ip| seen.insert(*ip))
        .collect();
    if ips.len() < 2 {
        return None;
    }
    let first: BTreeSet<&str> = ips[..ips.len() / 2].iter().copied().collect();
    let part = |keep: bool| {
        let side = |entries: &[(&'a str, Vec<&'a str>)]| {
            entries
                .iter()
                .filter(|(ip, _)| first.contains(ip) == keep)
                .cloned()
                .collect()
        };
        Message {
            register: side(&message.register),
            unregister: side(&message.unregister),
        }
    };
    Some((part(true), part(false)))
}

/// Every registered IP with the tags this plugin owns; IPs left without
/// owned tags are dropped.
pub fn registered(config: &Config, host: &mut impl Host) -> Result<IpTags, Failure> {
    let mut actual = IpTags::new();
    each_registered(config, host, |_, ip, owned| {
        actual.entry(ip).or_default().extend(owned);
        Ok(())
    })?;
    Ok(actual)
}

/// Hands `each` every registered IP that holds tags this plugin owns, with
/// those tags, a page of the firewall's answer at a time.
pub fn each_registered<H: Host>(
    config: &Config,
    host: &mut H,
    mut each: impl FnMut(&mut H, String, BTreeSet<String>) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut start = 1;
    for _ in 0..MAX_PAGES {
        let answer = post(config, host, uid::registered_ip_query(config, start))?;
        let page = response::registered_ips(&answer)?;
        let full = page.listed >= uid::PAGE_SIZE;
        for (ip, found) in page.ips {
            let owned: BTreeSet<String> =
                found.into_iter().filter(|t| config.owns_tag(t)).collect();
            if !owned.is_empty() {
                let ip = tags::normalise_ip(&ip).unwrap_or(ip);
                each(host, ip, owned)?;
            }
        }
        if !full {
            return Ok(());
        }
        start += uid::PAGE_SIZE;
    }
    Err(Failure::retry(format!(
        "the firewall listed more than {} registered IPs; is it ignoring start-point?",
        MAX_PAGES * uid::PAGE_SIZE
    )))
}
