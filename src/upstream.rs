//! Where a data source lives and how sealgate reaches it: the upstream
//! address parsed from the configured URL, and name resolution that never
//! blocks a worker thread and never panics (unlike `HttpPeer::new("host:port")`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use url::{Host, Url};

/// How long a resolved answer is reused. getaddrinfo does not expose TTLs;
/// a short fixed reuse keeps DNS off the per-request path while still
/// following record changes within seconds.
const RESOLVE_REUSE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamHost {
    Name(String),
    Ip(IpAddr),
}

/// The parsed, validated destination of a data source.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub tls: bool,
    pub host: UpstreamHost,
    pub port: u16,
    /// The URL's path without its trailing slash ("" for the root), so that
    /// `base_path + rest` never doubles a slash.
    pub base_path: String,
    /// Value of the `Host` header sent upstream.
    pub authority: String,
    /// Always non-empty: pingora turns certificate verification off
    /// entirely when SNI is empty, so IP URLs use the IP string.
    pub sni: String,
}

impl Upstream {
    pub fn from_url(url: &Url) -> Result<Upstream, String> {
        // A database's TLS is negotiated inside its protocol and chosen by
        // the data source's `sslmode` or `ssl_mode`; verified TLS is the default.
        let (tls, default_port) = match url.scheme() {
            "https" => (true, None),
            "http" => (false, None),
            "postgresql" | "postgres" => (true, Some(5432)),
            "mysql" | "mariadb" => (true, Some(3306)),
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; use http://, https://, postgresql:// or mysql://"
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL are not allowed; use `credential`".into());
        }
        if url.query().is_some() {
            return Err("a query string in the data source URL is not allowed".into());
        }
        if url.fragment().is_some() {
            return Err("a fragment in the data source URL is not allowed".into());
        }
        let port = url
            .port_or_known_default()
            .or(default_port)
            .ok_or_else(|| "the URL has no port and no known default".to_string())?;
        let (host, host_text) = match url.host() {
            // A URL of a scheme the WHATWG parser does not know keeps an
            // IPv4 host as text.
            Some(Host::Domain(d)) if d.parse::<std::net::Ipv4Addr>().is_ok() => {
                let ip: std::net::Ipv4Addr = d.parse().map_err(|_| "bad IPv4 host".to_string())?;
                (UpstreamHost::Ip(IpAddr::V4(ip)), ip.to_string())
            }
            Some(Host::Domain(d)) if !d.is_empty() => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                (UpstreamHost::Name(d.clone()), d)
            }
            Some(Host::Ipv4(ip)) => (UpstreamHost::Ip(IpAddr::V4(ip)), ip.to_string()),
            Some(Host::Ipv6(ip)) => (UpstreamHost::Ip(IpAddr::V6(ip)), format!("[{ip}]")),
            _ => return Err("the URL has no host".into()),
        };
        let authority = match url.port() {
            Some(p) => format!("{host_text}:{p}"),
            None => host_text,
        };
        let sni = match &host {
            UpstreamHost::Name(n) => n.clone(),
            UpstreamHost::Ip(ip) => ip.to_string(),
        };
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            tls,
            host,
            port,
            base_path,
            authority,
            sni,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("name resolution timed out")]
    Timeout,
    #[error("name resolution failed: {0}")]
    Failed(std::io::Error),
    #[error("name resolved to no address")]
    Empty,
}

/// A resolved answer and when it was obtained.
type Answer = (Instant, Arc<[SocketAddr]>);

/// Where a request may connect: an IP from the URL itself, or the answer
/// of a lookup, shared by every request that reuses it. Neither allocates
/// per request.
pub enum Addresses {
    Literal([SocketAddr; 1]),
    Resolved(Arc<[SocketAddr]>),
}

impl std::ops::Deref for Addresses {
    type Target = [SocketAddr];

    fn deref(&self) -> &[SocketAddr] {
        match self {
            Addresses::Literal(one) => one,
            Addresses::Resolved(many) => many,
        }
    }
}

/// Resolves upstream names off the worker threads (tokio's blocking pool)
/// with a deadline, and reuses answers briefly.
#[derive(Default)]
pub struct Resolver {
    /// By name, then port, so a hit is looked up with the borrowed name.
    answers: RwLock<HashMap<String, HashMap<u16, Answer>>>,
}

impl Resolver {
    pub async fn resolve(
        &self,
        host: &UpstreamHost,
        port: u16,
        deadline: Duration,
    ) -> Result<Addresses, ResolveError> {
        let name = match host {
            UpstreamHost::Ip(ip) => return Ok(Addresses::Literal([SocketAddr::new(*ip, port)])),
            UpstreamHost::Name(name) => name,
        };
        if let Ok(answers) = self.answers.read() {
            if let Some((at, addrs)) = answers.get(name).and_then(|ports| ports.get(&port)) {
                if at.elapsed() < RESOLVE_REUSE {
                    return Ok(Addresses::Resolved(addrs.clone()));
                }
            }
        }
        let lookup = tokio::net::lookup_host((name.as_str(), port));
        let addrs: Arc<[SocketAddr]> = match tokio::time::timeout(deadline, lookup).await {
            Err(_) => return Err(ResolveError::Timeout),
            Ok(Err(e)) => return Err(ResolveError::Failed(e)),
            Ok(Ok(found)) => found.collect::<Vec<_>>().into(),
        };
        if addrs.is_empty() {
            return Err(ResolveError::Empty);
        }
        if let Ok(mut answers) = self.answers.write() {
            answers
                .entry(name.clone())
                .or_default()
                .insert(port, (Instant::now(), addrs.clone()));
        }
        Ok(Addresses::Resolved(addrs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Upstream, String> {
        Upstream::from_url(&Url::parse(s).unwrap())
    }

    #[test]
    fn https_name_keeps_base_path_without_trailing_slash() {
        let u = parse("https://API.example.com/v1/").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, UpstreamHost::Name("api.example.com".into()));
        assert_eq!((u.port, u.base_path.as_str()), (443, "/v1"));
        assert_eq!(
            (u.authority.as_str(), u.sni.as_str()),
            ("api.example.com", "api.example.com")
        );
    }

    #[test]
    fn ip_urls_use_the_ip_as_sni_and_bracket_v6_in_host() {
        let u = parse("https://[::1]:8443").unwrap();
        assert_eq!(u.sni, "::1");
        assert_eq!(u.authority, "[::1]:8443");
        assert_eq!(u.base_path, "");
        let u = parse("http://127.0.0.1:18080/x").unwrap();
        assert_eq!(
            (u.sni.as_str(), u.authority.as_str()),
            ("127.0.0.1", "127.0.0.1:18080")
        );
    }

    #[test]
    fn database_urls_take_the_default_port_and_ip_hosts_are_ips() {
        let u = parse("postgresql://127.0.0.1/orders").unwrap();
        assert_eq!(u.host, UpstreamHost::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!((u.port, u.base_path.as_str()), (5432, "/orders"));
        let u = parse("postgres://db.internal:6543/x").unwrap();
        assert_eq!(u.host, UpstreamHost::Name("db.internal".into()));
        assert_eq!(u.port, 6543);
    }

    #[test]
    fn refuses_userinfo_query_and_other_schemes() {
        assert!(parse("https://u:p@example.com")
            .unwrap_err()
            .contains("credentials"));
        assert!(parse("https://example.com/?a=1")
            .unwrap_err()
            .contains("query"));
        assert!(parse("ftp://example.com").unwrap_err().contains("scheme"));
    }

    #[tokio::test]
    async fn answers_are_reused_per_name_and_port_and_literals_need_no_lookup() {
        let resolver = Resolver::default();
        let deadline = Duration::from_secs(5);
        let localhost = UpstreamHost::Name("localhost".into());
        let shared = |a: &Addresses| match a {
            Addresses::Resolved(many) => Some(many.clone()),
            Addresses::Literal(_) => None,
        };
        let first = resolver.resolve(&localhost, 8080, deadline).await.unwrap();
        let again = resolver.resolve(&localhost, 8080, deadline).await.unwrap();
        assert!(Arc::ptr_eq(
            &shared(&first).unwrap(),
            &shared(&again).unwrap()
        ));
        assert!(first
            .iter()
            .all(|a| a.port() == 8080 && a.ip().is_loopback()));
        let other_port = resolver.resolve(&localhost, 9090, deadline).await.unwrap();
        assert!(other_port.iter().all(|a| a.port() == 9090));

        let literal = UpstreamHost::Ip("192.0.2.7".parse().unwrap());
        let addrs = resolver.resolve(&literal, 443, deadline).await.unwrap();
        assert_eq!(&*addrs, &[SocketAddr::from(([192, 0, 2, 7], 443))]);
    }
}
