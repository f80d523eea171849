//! Byte-level helpers shared by the store and the CPU transport: length-
//! prefixed frames, a tiny encoder/decoder for their fields, and the socket
//! options every connection of this layer gets. Hand-written because the
//! messages are a handful of integers and strings; a serialization crate
//! would add more than it saves.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Refuse frames larger than this: a corrupt length must not make us
/// allocate gigabytes. Store values are small (ids, hashes, addresses).
const MAX_FRAME: usize = 256 << 20;

/// Writes `u32 length | payload` with one syscall where the OS allows.
pub(crate) fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

pub(crate) fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame of {len} bytes is over the {MAX_FRAME}-byte limit (not a bamba-train peer?)"
            ),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

#[derive(Default)]
pub(crate) struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u64(v.len() as u64);
        s.0.extend_from_slice(v);
        s
    }
    pub fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
    pub fn strs<S: AsRef<str>>(self, v: &[S]) -> Self {
        v.iter()
            .fold(self.u64(v.len() as u64), |e, s| e.str(s.as_ref()))
    }
    pub fn u64s(self, v: &[usize]) -> Self {
        v.iter()
            .fold(self.u64(v.len() as u64), |e, &x| e.u64(x as u64))
    }
}

/// Reads fields back; every error is a protocol violation by the other side.
pub(crate) struct Dec<'a>(pub &'a [u8]);

fn short() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "message ends early")
}

impl Dec<'_> {
    pub fn u8(&mut self) -> io::Result<u8> {
        let (&v, rest) = self.0.split_first().ok_or_else(short)?;
        self.0 = rest;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(short());
        }
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(v)
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| short())?))
    }
    pub fn i64(&mut self) -> io::Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn len(&mut self) -> io::Result<usize> {
        let n = self.u64()? as usize;
        // Every element takes at least a byte, so a larger count is corrupt.
        if n > self.0.len() {
            return Err(short());
        }
        Ok(n)
    }
    pub fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }
    pub fn str(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "string is not UTF-8"))
    }
    pub fn strs(&mut self) -> io::Result<Vec<String>> {
        let n = self.len()?;
        (0..n).map(|_| self.str()).collect()
    }
    pub fn u64s(&mut self) -> io::Result<Vec<usize>> {
        let n = self.len()?;
        (0..n).map(|_| self.u64().map(|v| v as usize)).collect()
    }
}

/// Options for every connection of this layer: no Nagle delay (small
/// control messages must not wait for an ACK), and TCP keepalive so that a
/// peer whose machine vanished without closing the connection (power loss,
/// network partition) is noticed by the kernel in about half a minute even
/// on a connection that is idle between collectives.
pub(crate) fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    set_keepalive(stream, Duration::from_secs(10), Duration::from_secs(5), 4)
}

#[cfg(unix)]
fn set_keepalive(
    stream: &TcpStream,
    idle: Duration,
    interval: Duration,
    probes: u32,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: fd is a live socket owned by `stream`; the option value is
        // a c_int on the stack whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            idle.as_secs() as libc::c_int,
        )?;
        set(
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            interval.as_secs() as libc::c_int,
        )?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes as libc::c_int)?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (idle, interval, probes);
    Ok(())
}

#[cfg(not(unix))]
fn set_keepalive(_: &TcpStream, _: Duration, _: Duration, _: u32) -> io::Result<()> {
    Ok(())
}

/// Whether an I/O error means "nothing arrived in time" (the socket timeout
/// fired) rather than a broken connection. Unix reports a timed-out
/// `SO_RCVTIMEO` read as `WouldBlock`.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether an I/O error means the other side closed or reset the connection.
pub(crate) fn is_closed(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}
