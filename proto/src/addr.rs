//! `host:port` as the settings name a scaler or a relay (`SCALER_ADDR`,
//! `RELAY_ADDR`): a DNS name or an IP (IPv6 in brackets) and a port, one
//! parsing rule for every binary that takes one.

use std::{fmt, str::FromStr};

/// A host (DNS name or IP) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port` (an `http://` or `https://` prefix is dropped);
    /// `example` is what an error suggests instead.
    pub fn parse(s: &str, example: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .unwrap_or(s);
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; use host:port, e.g. {example}"))?;
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let host = match bracketed {
            Some(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => h,
            Some(_) => return Err(format!("{s:?}: not an IPv6 address in brackets")),
            // Unbracketed, "::1:9090" is itself an IPv6 address: refuse the guess.
            None if host.contains(':') => {
                return Err(format!(
                    "{s:?}: an IPv6 address must be in brackets, e.g. [fd00::1]:9090"
                ));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535)"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The name the server's certificate must carry.
    pub fn domain(&self) -> &str {
        &self.host
    }

    /// A comma-separated list (`SCALER_ADDR`), duplicates dropped, at
    /// least one entry.
    pub fn parse_list(list: &str, example: &str) -> Result<Vec<Self>, String> {
        let mut addrs = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = Self::parse(item, example)?;
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(format!("{list:?} names no address; e.g. {example}"));
        }
        Ok(addrs)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, "itw-scaler-ingest.itw-system:9090")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        let ok = |s: &str, host: &str, port: u16| {
            assert_eq!(
                s.parse::<HostPort>(),
                Ok(HostPort {
                    host: host.into(),
                    port
                }),
                "{s}"
            );
        };
        ok(
            "itw-scaler-ingest.itw-system:9090",
            "itw-scaler-ingest.itw-system",
            9090,
        );
        ok("127.0.0.1:9090", "127.0.0.1", 9090);
        ok("[::1]:9090", "::1", 9090);
        ok("http://scaler:1", "scaler", 1);
        for bad in [
            "scaler",
            "scaler:0",
            "scaler:http",
            ":9090",
            "::1:9090",
            "scaler:70000",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
        assert_eq!(
            HostPort::parse("relay", "itw-relay.itw-system:9090"),
            Err("\"relay\" has no port; use host:port, e.g. itw-relay.itw-system:9090".into())
        );
        assert_eq!(
            "[::1]:9090".parse::<HostPort>().map(|a| a.to_string()),
            Ok("[::1]:9090".into())
        );
    }

    #[test]
    fn a_list_drops_duplicates_and_needs_one() {
        let list = HostPort::parse_list(" a:1, b:2 ,a:1,", "x:1").unwrap();
        assert_eq!(
            list.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["a:1", "b:2"]
        );
        assert_eq!(
            HostPort::parse_list(" , ", "x:1"),
            Err("\" , \" names no address; e.g. x:1".into())
        );
        assert_eq!(
            HostPort::parse_list("a:1,b", "x:1"),
            Err("\"b\" has no port; use host:port, e.g. x:1".into())
        );
    }
}
