//! What both protocols read from a request and say about an answer: the one
//! presented key, the required scopes, the identity headers of an allowed
//! request and the metric label. The gRPC and HTTP servers both build on it,
//! and neither imports the other.

use std::{borrow::Cow, sync::Arc};

use axum::http::{HeaderName, HeaderValue};

use super::{
    core::{Checked, Verifier},
    snapshot::Identity,
};
use crate::telemetry::Metrics;

/// The longest header value that can hold a key; longer ones are refused unread.
pub const MAX_KEY_HEADER: usize = 256;

/// Identity headers on an allowed request.
pub const IDENTITY_HEADERS: [&str; 7] = [
    "x-keyward-key-id",
    "x-keyward-owner",
    "x-keyward-team",
    "x-keyward-scopes",
    "x-keyward-namespace",
    "x-keyward-name",
    "x-keyward-cluster",
];

/// What every handler shares.
#[derive(Clone)]
pub struct Endpoint {
    /// The key set.
    pub verifier: Arc<Verifier>,
    /// Metrics for `/metrics` and the check counters.
    pub metrics: Arc<Metrics>,
    /// The header that carries a key besides `Authorization: Bearer`, e.g. `x-api-key`.
    pub key_header: HeaderName,
}

/// Where the key came from, so that it can be removed before the request goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer …`.
    Authorization,
    /// The configured key header.
    Custom,
}

/// Finds the one key in a request: `Authorization: Bearer <key>` or the key
/// header. No key, an empty or oversized value, a non-Bearer Authorization, or
/// more than one key is `None`: a definite 401, and nothing of it is logged.
pub fn presented_key<'a>(
    authorization: impl Iterator<Item = &'a [u8]>,
    custom: impl Iterator<Item = &'a [u8]>,
) -> Option<(&'a str, KeySource)> {
    let mut found = None;
    for (value, source) in authorization
        .map(|v| (v, KeySource::Authorization))
        .chain(custom.map(|v| (v, KeySource::Custom)))
    {
        if value.is_empty() || value.len() > MAX_KEY_HEADER || found.is_some() {
            return None;
        }
        let text = std::str::from_utf8(value).ok()?;
        let key = match source {
            KeySource::Authorization => {
                let (scheme, token) = text.split_once(' ')?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return None;
                }
                token.trim()
            }
            KeySource::Custom => text.trim(),
        };
        if key.is_empty() {
            return None;
        }
        found = Some((key, source));
    }
    found
}

/// Scopes from a list of `scope` values and a header, split on commas and spaces.
pub fn required_scopes<'a>(lists: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    lists
        .flat_map(|list| list.split([',', ' ']))
        .filter(|s| !s.is_empty())
        .collect()
}

/// [`IDENTITY_HEADERS`] as header names, made at compile time: inserting them
/// parses no name.
pub const IDENTITY_HEADER_NAMES: [HeaderName; 7] = [
    HeaderName::from_static(IDENTITY_HEADERS[0]),
    HeaderName::from_static(IDENTITY_HEADERS[1]),
    HeaderName::from_static(IDENTITY_HEADERS[2]),
    HeaderName::from_static(IDENTITY_HEADERS[3]),
    HeaderName::from_static(IDENTITY_HEADERS[4]),
    HeaderName::from_static(IDENTITY_HEADERS[5]),
    HeaderName::from_static(IDENTITY_HEADERS[6]),
];

/// The values of the identity headers, in the order of [`IDENTITY_HEADERS`],
/// borrowed from the identity; only scopes, when there are several, are
/// joined into a new string.
pub fn identity_values(identity: &Identity) -> [Cow<'_, str>; 7] {
    let scopes = match &*identity.scopes {
        [] => Cow::Borrowed(""),
        [one] => Cow::Borrowed(&**one),
        many => Cow::Owned(many.join(" ")),
    };
    [
        Cow::Borrowed(&*identity.key_id),
        Cow::Borrowed(&*identity.owner),
        Cow::Borrowed(&*identity.team),
        scopes,
        Cow::Borrowed(&*identity.namespace),
        Cow::Borrowed(&*identity.name),
        Cow::Borrowed(&*identity.cluster),
    ]
}

/// Identity header values for an allowed HTTP request, each made straight
/// from the identity's text (one copy, no intermediate `String`); values that
/// are not valid header text are `None` and left out (keyward's own fields
/// always are valid).
pub fn identity_header_values(identity: &Identity) -> [Option<HeaderValue>; 7] {
    identity_values(identity).map(|value| HeaderValue::from_str(&value).ok())
}

/// The metric label of an answer.
pub fn result_label(checked: &Checked) -> &'static str {
    match checked {
        Checked::Answer(verdict) => verdict.code.as_str(),
        Checked::Unavailable(_) => "unavailable",
    }
}
