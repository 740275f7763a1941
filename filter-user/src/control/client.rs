//! The client side of the control protocol (p25ctl): one request per connection, the
//! answer read line by line, no line longer than [`MAX_MESSAGE`].

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::{ListHead, ListView, MAX_MESSAGE, MAX_REQUEST, OffendersHead, Request, Response};

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("p25d is not running (nothing listens on {path}): {source}")]
    NotRunning {
        /// The socket path.
        path: String,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// The conversation failed half-way.
    #[error("talking to p25d on {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something this client cannot read.
    #[error("unreadable answer from p25d: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// One request's connection, from which the answer's lines are read.
#[derive(Debug)]
pub struct Answer {
    path: String,
    reader: BufReader<UnixStream>,
}

impl Answer {
    /// Reads the next line (at most [`MAX_MESSAGE`] bytes) as a `T`.
    pub fn line<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let line = read_line(&mut self.reader, MAX_MESSAGE).map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })?;
        let Some(line) = line else {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        };
        serde_json::from_slice(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Reads the first line, a [`Response`]: its data, or the daemon's refusal as
    /// [`ClientError::Refused`].
    pub fn head<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        match self.line::<Response<T>>()? {
            Response::Ok { data } => Ok(data),
            Response::Error { message } => Err(ClientError::Refused(message)),
        }
    }

    /// Reads `count` rows of a stream; a short stream is an error, never a short table.
    pub fn rows<T: DeserializeOwned>(&mut self, count: usize) -> Result<Vec<T>, ClientError> {
        // Grown as rows arrive: `count` comes from the other side.
        let mut rows = Vec::new();
        for _ in 0..count {
            rows.push(self.line()?);
        }
        Ok(rows)
    }
}

/// Reads one `\n`-terminated line of at most `cap` bytes (newline included); `None` at
/// the end of the stream. A longer line is an error, read no further than `cap`.
pub fn read_line(reader: &mut impl BufRead, cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX);
    reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() >= cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {cap} bytes"),
        ));
    }
    Ok(Some(line))
}

/// Sends one request; the answer is read from what this returns. Reads and writes each
/// wait at most `timeout`.
pub fn send(socket: &Path, req: &Request, timeout: Duration) -> Result<Answer, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::NotRunning {
        path: path.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    if line.len() > MAX_REQUEST {
        return Err(ClientError::Protocol(format!(
            "the request is {} bytes, longer than the {MAX_REQUEST} the daemon reads",
            line.len()
        )));
    }
    stream.write_all(&line).map_err(io)?;
    Ok(Answer {
        reader: BufReader::new(stream),
        path,
    })
}

/// Sends one request and reads its single-line answer as a `T`.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, ClientError> {
    send(socket, req, timeout)?.head()
}

/// `list`: the head, then its rows.
pub fn list(socket: &Path, timeout: Duration) -> Result<ListView, ClientError> {
    let mut answer = send(socket, &Request::List, timeout)?;
    let head: ListHead = answer.head()?;
    Ok(ListView {
        allow: answer.rows(head.allow)?,
        subscribers: answer.rows(head.subscribers)?,
    })
}

/// `offenders` (and `top`): the head, then its rows.
pub fn offenders(
    socket: &Path,
    since_secs: Option<u64>,
    limit: Option<usize>,
    timeout: Duration,
) -> Result<Vec<crate::offenders::OffenderView>, ClientError> {
    let mut answer = send(socket, &Request::Offenders { since_secs, limit }, timeout)?;
    let head: OffendersHead = answer.head()?;
    answer.rows(head.offenders)
}
