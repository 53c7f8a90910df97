//! The client side, for `cloister-remote`: one request per connection, the reply's status
//! and body.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the request failed")]
    Io(#[source] io::Error),
    #[error("the reply is not HTTP: {0:?}")]
    BadReply(String),
}

/// A reply: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Sends `method /api/v1/endpoint` with `body` to the API at `socket`.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // Adding a device can take as long as its backend takes to start (or, in server mode, to
    // connect: up to 60 s).
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(ClientError::Io)?;
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n",
        super::routes::PREFIX
    );
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .map_err(ClientError::Io)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(ClientError::Io)?;
    parse(&reply).ok_or(ClientError::BadReply(reply))
}

fn parse(reply: &str) -> Option<Reply> {
    let status = reply.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some(Reply {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse("HTTP/1.1 204 No Content\r\nServer: cloister\r\n\r\n"),
            Some(Reply {
                status: 204,
                body: String::new()
            })
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").map(|r| r.body),
            Some("{}".into())
        );
        assert_eq!(parse("garbage"), None);
    }
}
