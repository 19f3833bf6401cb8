//! Resolving an upstream's host name into endpoints, refreshed by Pingora's background loop.
//!
//! Pingora's `HttpPeer::new` resolves names synchronously and panics when that fails, so keygate
//! resolves here, asynchronously, and builds peers from addresses only.

use async_trait::async_trait;
use pingora_error::{ErrorType, OrErr, Result};
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::Backend;
use std::collections::{BTreeSet, HashMap};

/// Discovers the addresses of `host:port` through the system resolver.
#[derive(Debug, Clone)]
pub struct DnsDiscovery {
    /// Upstream name, for logs.
    pub upstream: String,
    /// Host name or IP literal.
    pub host: String,
    /// Port.
    pub port: u16,
}

#[async_trait]
impl ServiceDiscovery for DnsDiscovery {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .or_err_with(ErrorType::ConnectNoRoute, || {
                format!("upstream {}: cannot resolve {}", self.upstream, self.host)
            })?;
        let mut set = BTreeSet::new();
        for addr in addrs {
            set.insert(Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: 1,
                ext: http::Extensions::new(),
            });
        }
        if set.is_empty() {
            // Keep the previous endpoints rather than forgetting every address on a bad answer.
            return Err(pingora_error::Error::explain(
                ErrorType::ConnectNoRoute,
                format!(
                    "upstream {}: {} resolved to no address",
                    self.upstream, self.host
                ),
            ));
        }
        log::debug!(
            "upstream {}: {} resolved to {} endpoint(s)",
            self.upstream,
            self.host,
            set.len()
        );
        Ok((set, HashMap::new()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literal_resolves_to_itself() {
        let d = DnsDiscovery {
            upstream: "t".into(),
            host: "127.0.0.1".into(),
            port: 9,
        };
        let (set, _) = d.discover().await.unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.iter().next().unwrap().addr.to_string(), "127.0.0.1:9");
    }
}
