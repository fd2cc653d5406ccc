//! Kubernetes label selectors (`metav1.LabelSelector`), validated once and
//! matched many times.
//!
//! Semantics follow k8s.io/apimachinery `LabelSelectorAsSelector`: all
//! `matchLabels` and all `matchExpressions` must hold (AND); an empty selector
//! matches everything; `In`/`NotIn` need a non-empty value list, `Exists`/
//! `DoesNotExist` an empty one; `NotIn` and `DoesNotExist` also match objects
//! that lack the key.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated label selector. `Selector::default()` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// `matchLabels` folded into `In` requirements with one value.
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Validates `sel`; the error says which part is wrong (the caller names the object).
    pub fn parse(field: &str, sel: &LabelSelector) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            check_key(field, k)?;
            check_value(field, k, v)?;
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let place = format!("{field}.matchExpressions[{i}]");
            check_key(&place, &e.key)?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            for v in &values {
                check_value(&place, &e.key, v)?;
            }
            let r = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "{place}: operator {} needs at least one value",
                        e.operator
                    ))
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "{place}: operator {} takes no values",
                        e.operator
                    ))
                }
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(format!(
                        "{place}: unknown operator `{other}` (expected In, NotIn, Exists or DoesNotExist)"
                    ))
                }
            };
            requirements.push(r);
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    /// A selector of exactly these labels (`matchLabels`).
    pub fn labels(pairs: &[(&str, &str)]) -> Selector {
        let mut requirements: Vec<Requirement> = pairs
            .iter()
            .map(|(k, v)| Requirement::In(k.to_string(), BTreeSet::from([v.to_string()])))
            .collect();
        requirements.sort();
        Selector { requirements }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Label keys: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters of `[A-Za-z0-9_.-]` starting and ending alphanumeric
/// (Kubernetes "Labels and Selectors", syntax and character set).
fn check_key(field: &str, key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = |why: &str| Err(format!("{field}: label key `{key}` {why}"));
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return bad("has an empty or over-long prefix");
        }
        if !p
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return bad("has a prefix that is not a DNS subdomain");
        }
    }
    if name.is_empty() || name.len() > 63 {
        return bad("must have a name of 1 to 63 characters");
    }
    if !label_chars(name) {
        return bad("may only contain [A-Za-z0-9_.-], starting and ending alphanumeric");
    }
    Ok(())
}

fn check_value(field: &str, key: &str, value: &str) -> Result<(), String> {
    if value.len() > 63 || (!value.is_empty() && !label_chars(value)) {
        return Err(format!(
            "{field}: value `{value}` of label `{key}` must be at most 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn empty_matches_everything() {
        let s = Selector::parse("podSelector", &LabelSelector::default()).unwrap();
        assert!(s.matches(&l(&[])));
        assert!(s.matches(&l(&[("a", "b")])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let sel = LabelSelector {
            match_labels: Some(l(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("canary", "DoesNotExist", &[]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
            ]),
        };
        let s = Selector::parse("podSelector", &sel).unwrap();
        assert!(s.matches(&l(&[("app", "web"), ("tier", "a"), ("team", "x")])));
        // NotIn matches a missing key, and a different value.
        assert!(s.matches(&l(&[
            ("app", "web"),
            ("tier", "b"),
            ("team", "x"),
            ("env", "dev")
        ])));
        assert!(!s.matches(&l(&[
            ("app", "web"),
            ("tier", "b"),
            ("team", "x"),
            ("env", "prod")
        ])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&l(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("canary", "")
        ])));
        assert!(!s.matches(&l(&[("app", "db"), ("tier", "a"), ("team", "x")])));
    }

    #[test]
    fn invalid_selectors_are_rejected_with_the_place() {
        let cases = [
            (expr("a", "In", &[]), "needs at least one value"),
            (expr("a", "Exists", &["x"]), "takes no values"),
            (expr("a", "Equals", &["x"]), "unknown operator `Equals`"),
            (expr("-a", "Exists", &[]), "label key `-a`"),
            (expr("a/b/c", "Exists", &[]), "label key `a/b/c`"),
            (expr("a", "In", &["bad value"]), "value `bad value`"),
        ];
        for (e, want) in cases {
            let sel = LabelSelector {
                match_expressions: Some(vec![e]),
                ..Default::default()
            };
            let err = Selector::parse("spec.podSelector", &sel).unwrap_err();
            assert!(
                err.starts_with("spec.podSelector.matchExpressions[0]") && err.contains(want),
                "{err}"
            );
        }
        let sel = LabelSelector {
            match_labels: Some(l(&[("app", "x".repeat(64).as_str())])),
            ..Default::default()
        };
        assert!(Selector::parse("p", &sel).is_err());
        assert!(Selector::parse(
            "p",
            &LabelSelector {
                match_labels: Some(l(&[("example.com/app", "")])),
                ..Default::default()
            }
        )
        .is_ok());
    }
}
