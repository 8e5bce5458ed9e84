//! Kubernetes name rules, the one copy both binaries check names with: the
//! agent before it reports a name (its static service map, its settings),
//! the scaler when a name arrives (the Report stream, KEDA's triggers).
//!
//! The rules are Kubernetes' own, so that whatever a cluster can hold, an
//! agent may send and a scaler accepts:
//! - namespace: an RFC 1123 label (1-63 of `a-z`, `0-9`, `-`, starting and
//!   ending with a letter or digit);
//! - Service name: an RFC 1035 label (the same, but starting with a letter);
//! - pod name: an RFC 1123 subdomain (RFC 1123 labels joined by `.`, at most
//!   253 characters).
//!
//! Valid names hold no `/`, `%`, NUL nor upper case, which the scaler's keys
//! and metric labels rely on. This module only judges names: it never trims,
//! lowercases nor otherwise repairs one.

/// Why a name was refused, phrased to follow "`field` = "value": ".
pub type NameProblem = &'static str;

/// A namespace (RFC 1123 label): lowercase letters, digits and `-`, starting
/// and ending with a letter or digit, 1-63 characters.
pub fn namespace(name: &str) -> Result<(), NameProblem> {
    label(name, false).map_err(|()| {
        "not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
    })
}

/// A Service name (RFC 1035 label): as a namespace, but starting with a letter.
pub fn service(name: &str) -> Result<(), NameProblem> {
    label(name, true).map_err(|()| {
        "not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
    })
}

/// A pod name (RFC 1123 subdomain).
pub fn pod(name: &str) -> Result<(), NameProblem> {
    subdomain(name).map_err(|_| {
        "not a Kubernetes pod name (lowercase letters, digits, '-' and '.', at most 253 characters)"
    })
}

/// A DNS subdomain (RFC 1123): dot-separated RFC 1123 labels, at most 253
/// characters. Pod names are one; so are the prefixes of label keys.
pub fn subdomain(name: &str) -> Result<(), NameProblem> {
    const PROBLEM: NameProblem = "not a DNS subdomain (dot-separated parts of lowercase letters, digits and '-', each starting and ending with a letter or digit, at most 253 characters)";
    if name.is_empty() || name.len() > 253 {
        return Err(PROBLEM);
    }
    name.split('.')
        .try_for_each(|part| label(part, false))
        .map_err(|()| PROBLEM)
}

fn label(name: &str, letter_first: bool) -> Result<(), ()> {
    let bytes = name.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return Err(());
    };
    let lower_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = bytes.len() <= 63
        && if letter_first {
            first.is_ascii_lowercase()
        } else {
            lower_alnum(first)
        }
        && lower_alnum(last)
        && bytes.iter().all(|&b| lower_alnum(b) || b == b'-');
    if ok { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        for ok in ["default", "a", "kube-system", "0ns", "a1-b2", "9web"] {
            assert_eq!(namespace(ok), Ok(()), "{ok}");
        }
        for ok in ["web", "a", "my-svc-2", "web9"] {
            assert_eq!(service(ok), Ok(()), "{ok}");
        }
        for ok in ["web-7d9f8-abcde", "a.b.c", "0pod", "9web"] {
            assert_eq!(pod(ok), Ok(()), "{ok}");
        }
        assert_eq!(namespace(&"a".repeat(63)), Ok(()));
        assert_eq!(service(&"a".repeat(63)), Ok(()));
        let longest = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(longest.len(), 253);
        assert_eq!(pod(&longest), Ok(()));
        assert_eq!(subdomain(&longest), Ok(()));
        assert_eq!(subdomain("app.kubernetes.io"), Ok(()));
    }

    #[test]
    fn refuses_what_kubernetes_refuses() {
        for bad in ["", "Default", "-a", "a-", "a_b", "a/b", "a%b", "a.b", "é"] {
            assert!(namespace(bad).is_err(), "{bad:?}");
            assert!(service(bad).is_err(), "{bad:?}");
        }
        assert!(namespace(&"a".repeat(64)).is_err());
        assert!(service(&"a".repeat(64)).is_err());
        // Services must start with a letter.
        assert!(service("0web").is_err());
        assert!(service("web/x").is_err());
        for bad in ["", "a..b", ".a", "a.", "A", "a/b", "-a.b", "a.b-", "a_b.c"] {
            assert!(pod(bad).is_err(), "{bad:?}");
            assert!(subdomain(bad).is_err(), "{bad:?}");
        }
        assert!(pod(&"a".repeat(254)).is_err());
        assert!(pod(&format!("{}.b", "a".repeat(64))).is_err());
    }

    /// The one rule the agent and the scaler used to disagree on: a Service
    /// name must start with a letter, a namespace (or a pod) need not.
    #[test]
    fn a_leading_digit_is_refused_for_a_service_only() {
        assert_eq!(
            service("9web"),
            Err(
                "not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
            )
        );
        assert_eq!(service("0web"), service("9web"));
        assert_eq!(namespace("9web"), Ok(()));
        assert_eq!(pod("9web"), Ok(()));
    }

    #[test]
    fn problems_name_the_kind_of_name() {
        assert_eq!(
            namespace("Apps"),
            Err(
                "not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
            )
        );
        assert_eq!(
            pod("Web_0"),
            Err(
                "not a Kubernetes pod name (lowercase letters, digits, '-' and '.', at most 253 characters)"
            )
        );
        assert_eq!(
            subdomain("UPPER.example"),
            Err(
                "not a DNS subdomain (dot-separated parts of lowercase letters, digits and '-', each starting and ending with a letter or digit, at most 253 characters)"
            )
        );
    }
}
