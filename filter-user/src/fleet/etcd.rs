//! The etcd client settings and the reads both p25d and p25ctl make.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};

use super::{Error, follower::Kv, keys::Layout};

/// HTTP/2 keepalive: a ping this often on the connection, even when idle...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ...and the connection counts as dead when a ping is not answered this soon. A silently
/// dead etcd (a cut cable, a frozen VM) is noticed within about 4 s.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request (a read, a put) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `--etcd URL[,URL...]`: `http://host:port` endpoints (a bare `host:port` means
/// http). TLS is not built in: run etcd's gRPC proxy or a TLS terminator on the router's
/// loopback for that.
pub fn endpoints(text: &str) -> Result<Vec<String>, Error> {
    let bad = |why: String| Error::Endpoints {
        text: text.to_owned(),
        why,
    };
    let endpoints: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() {
        return Err(bad(
            "give at least one endpoint, such as http://127.0.0.1:2379".into(),
        ));
    }
    for endpoint in &endpoints {
        if endpoint.starts_with("https://") {
            return Err(bad(format!(
                "{endpoint}: TLS is not supported by this build; use http:// to a local etcd \
                 gRPC proxy"
            )));
        }
        let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
        if rest.contains("://") || !rest.contains(':') || rest.contains(char::is_whitespace) {
            return Err(bad(format!(
                "{endpoint:?} is not an endpoint such as http://127.0.0.1:2379"
            )));
        }
    }
    Ok(endpoints)
}

/// Connects to etcd with the keepalive and connect timeout above.
pub async fn connect(endpoints: &[String]) -> Result<Client, Error> {
    let options = ConnectOptions::new()
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(CONNECT_TIMEOUT);
    within("connecting", Client::connect(endpoints, Some(options))).await
}

/// Runs one etcd request under [`REQUEST_TIMEOUT`].
pub async fn within<T>(
    what: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::Etcd {
            what,
            message: source.to_string(),
        }),
        Err(_) => Err(Error::Timeout {
            what,
            after: REQUEST_TIMEOUT,
        }),
    }
}

/// Keys per page of a full read. gRPC refuses a response over 4 MiB by default, and one
/// Get of a 1M-entry fleet allowlist is about 150 MB: pages of 10,000 keys (about
/// 1.5 MB) keep every response far below the limit and etcd's own per-request work small.
pub const READ_PAGE: i64 = 10_000;

/// Reads every key of the fleet under `layout` at one revision, page by page: the
/// revision and the keys. Every page after the first is read at the first page's
/// revision, so the result is one consistent state even while the fleet changes.
pub async fn read_all(client: &mut Client, layout: &Layout) -> Result<(i64, Vec<Kv>), Error> {
    let root = layout.root().as_bytes().to_vec();
    let end = prefix_end(&root);
    let mut from = root;
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(READ_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut response = within(
            "reading the fleet state",
            client.get(from.clone(), Some(options)),
        )
        .await?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        let more = response.more();
        let page = response.take_kvs();
        let Some(last) = page.last().map(|kv| kv.key().to_vec()) else {
            break;
        };
        kvs.extend(page.into_iter().map(|kv| {
            let mod_revision = kv.mod_revision();
            let (key, value) = kv.into_key_value();
            Kv {
                key,
                value,
                mod_revision,
            }
        }));
        if !more {
            break;
        }
        // The next page starts just after the last key read.
        from = last;
        from.push(0);
    }
    Ok((revision, kvs))
}

/// The end of the key range holding every key that starts with `prefix` (etcd's
/// convention: the prefix with its last byte below 0xff incremented; `\0` for all keys).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_bound_exactly_the_prefixed_keys() {
        assert_eq!(prefix_end(b"/p25/"), b"/p250");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn endpoints_are_parsed_and_checked() -> Result<(), Error> {
        assert_eq!(
            endpoints("http://127.0.0.1:2379, 127.0.0.1:2380,")?,
            ["http://127.0.0.1:2379", "127.0.0.1:2380"]
        );
        for bad in [
            "",
            ",",
            "https://127.0.0.1:2379",
            "localhost",
            "ftp://x:1",
            "a b:1",
        ] {
            assert!(endpoints(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }
}
