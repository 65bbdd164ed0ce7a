//! Query strings, the same way on every route (SPEC §3: "an unknown query parameter on any
//! endpoint is a 400 that names it").
//!
//! Each endpoint declares the parameters it takes as a struct and extracts it with
//! [`Params`]; an endpoint that takes none extracts [`Params<NoParams>`]. A parameter the
//! struct does not name is a 400 problem, `urn:sluice:unknown-parameter`, that names every
//! unknown parameter, suggests the one it was probably meant to be (`/v1/ws?device=x`: "did
//! you mean `device_id`?"), and lists what the endpoint takes. Known parameters with bad
//! values are the handler's to judge, as before.
//!
//! The accepted names are read from the struct itself (the field list that serde's derive
//! passes to `deserialize_struct`), so each endpoint writes its parameters in one place.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::Uri;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;

use super::problem::Problem;

/// The query string of an endpoint that takes no parameter.
#[derive(Debug, Deserialize)]
pub struct NoParams {}

/// An endpoint's query parameters: `T`, a struct with named fields, one per parameter.
/// Rejects the request with a [`Problem`] when a parameter is not one of `T`'s fields, or
/// when the query string does not deserialize into `T`.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        parse(&parts.uri).map(Params)
    }
}

/// Parses the query string of `uri` into `T`, refusing any parameter `T` does not name.
pub fn parse<T: DeserializeOwned>(uri: &Uri) -> Result<T, Problem> {
    let known = field_names::<T>();
    // Decoded as the form `T` is decoded from, so `%64evice` is `device` in both.
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| Problem::bad_request(e.body_text()))?;
    let mut unknown: Vec<&str> = Vec::new();
    for (name, _) in &pairs {
        if !known.contains(&name.as_str()) && !unknown.contains(&name.as_str()) {
            unknown.push(name);
        }
    }
    if !unknown.is_empty() {
        return Err(Problem::unknown_parameter(unknown_detail(&unknown, known)));
    }
    // Named before the decoder sees it, which would say "Failed to deserialize query string:
    // duplicate field `step`".
    if let Some((name, _)) = pairs
        .iter()
        .enumerate()
        .find(|(i, (n, _))| pairs[..*i].iter().any(|(m, _)| m == n))
        .map(|(_, p)| p)
    {
        return Err(Problem::bad_request(format!(
            "query parameter `{name}` is given more than once; give it once"
        )));
    }
    Query::<T>::try_from_uri(uri)
        .map(|Query(t)| t)
        .map_err(|e| Problem::bad_request(e.body_text()))
}

/// `unknown query parameter `device` (did you mean `device_id`?); this endpoint takes
/// `device_id``: every unknown name in its own clause, so that each one is named as such.
fn unknown_detail(unknown: &[&str], known: &[&str]) -> String {
    let mut clauses: Vec<String> = unknown
        .iter()
        .map(|u| match suggestion(u, known) {
            Some(k) => format!("unknown query parameter `{u}` (did you mean `{k}`?)"),
            None => format!("unknown query parameter `{u}`"),
        })
        .collect();
    clauses.push(if known.is_empty() {
        "this endpoint takes none".to_owned()
    } else {
        let names: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        format!("this endpoint takes {}", names.join(", "))
    });
    clauses.join("; ")
}

/// The known name `unknown` was probably meant to be: the same but for case or `-`/`_`, one
/// a prefix of the other (`device` for `device_id`, `metrics` for `metric`), or a typo away
/// (one edit in a short name, two in a longer one).
fn suggestion<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    let u = unknown.to_ascii_lowercase().replace('-', "_");
    if u.len() < 2 {
        return None;
    }
    let prefix = |k: &str| {
        let (short, long) = if u.len() <= k.len() {
            (u.as_str(), k)
        } else {
            (k, u.as_str())
        };
        short.len() >= 4 && long.starts_with(short)
    };
    if let Some(k) = known.iter().find(|k| **k == u || prefix(k)) {
        return Some(k);
    }
    let allowed = if u.len() <= 4 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (edit_distance(&u, k), *k))
        .filter(|(d, _)| *d <= allowed)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes (parameter names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// The field names of the struct `T`, as serde's derive declares them. Empty for a type
/// that is not a struct with named fields (no parameter is then accepted).
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = FieldProbe(None);
    // The probe always fails: it only records what the derive asked for.
    let _ = T::deserialize(&mut probe);
    probe.0.unwrap_or(&[])
}

/// A deserializer that reads nothing: it records the field list a struct asks for.
struct FieldProbe(Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for &mut FieldProbe {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(fields);
        Err(de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Two {
        device_id: Option<String>,
        limit: Option<String>,
    }

    fn uri(q: &str) -> Uri {
        format!("/x{q}").parse().unwrap()
    }

    #[test]
    fn field_names_come_from_the_struct() {
        assert_eq!(field_names::<Two>(), ["device_id", "limit"]);
        assert!(field_names::<NoParams>().is_empty());
        assert!(field_names::<Vec<(String, String)>>().is_empty());
    }

    #[test]
    fn known_parameters_parse_and_unknown_ones_are_all_named() {
        let two: Two = parse(&uri("?device_id=a&limit=3")).unwrap();
        assert_eq!(two.device_id.as_deref(), Some("a"));
        assert!(parse::<NoParams>(&uri("")).is_ok());
        assert!(parse::<NoParams>(&uri("?")).is_ok());

        let p = parse::<Two>(&uri("?device=x&zzz=1&device=y&%6Cimt=2")).unwrap_err();
        assert_eq!(p.status, 400);
        assert_eq!(p.kind, "urn:sluice:unknown-parameter");
        assert_eq!(
            p.detail,
            "unknown query parameter `device` (did you mean `device_id`?); \
             unknown query parameter `zzz`; \
             unknown query parameter `limt` (did you mean `limit`?); \
             this endpoint takes `device_id`, `limit`"
        );
        let p = parse::<NoParams>(&uri("?v=2&y")).unwrap_err();
        assert_eq!(
            p.detail,
            "unknown query parameter `v`; unknown query parameter `y`; this endpoint takes none"
        );
        // A known name given twice is a plain 400 that names it.
        let p = parse::<Two>(&uri("?limit=1&limit=2")).unwrap_err();
        assert_eq!(p.kind, "urn:sluice:malformed");
        assert_eq!(
            p.detail,
            "query parameter `limit` is given more than once; give it once"
        );
    }

    #[test]
    fn suggestions_are_close_names_only() {
        let live = ["device", "metric"];
        assert_eq!(suggestion("device_id", &live), Some("device"));
        assert_eq!(suggestion("metrics", &live), Some("metric"));
        assert_eq!(suggestion("Device", &live), Some("device"));
        assert_eq!(suggestion("devise", &live), Some("device"));
        assert_eq!(suggestion("token", &live), None);
        let readings = ["from", "to", "metric", "limit", "order", "cursor"];
        assert_eq!(suggestion("token", &readings), None);
        assert_eq!(suggestion("t", &readings), None);
        assert_eq!(suggestion("ordr", &readings), Some("order"));
        assert_eq!(suggestion("metrics", &readings), Some("metric"));
        assert_eq!(suggestion("device-id", &["device_id"]), Some("device_id"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
