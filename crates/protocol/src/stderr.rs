//! The daemon's stderr channel: log lines, activities, data requests and the final
//! `STDERR_LAST` / `STDERR_ERROR` that every worker operation ends with (daemon.cc
//! `TunnelLogger`, remote-store.cc `processStderr`).
//!
//! ```text
//! msg  = NEXT  string                                  (a log line with its "\n")
//!      | READ  int maxLen                              (client answers with a string)
//!      | WRITE string                                  (data for the client's sink)
//!      | LAST                                          (the reply payload follows)
//!      | ERROR "Error" int level "Error" string msg int havePos(0)
//!              int n, n × (int 0, string hint)        (1.26+; no reply follows)
//!      | START_ACTIVITY int id, int level, int type, string text, fields, int parent
//!      | STOP_ACTIVITY  int id
//!      | RESULT int id, int type, fields
//! NEXT 0x6f6c6d67  READ 0x64617461  WRITE 0x64617416  LAST 0x616c7473  ERROR 0x63787470
//! START_ACTIVITY 0x53545254  STOP_ACTIVITY 0x53544f50  RESULT 0x52534c54
//! ```
//!
//! Activity and result types are those of Nix 2.8's logging.hh; an unknown number is an
//! error (stricter than Nix, which casts). `havePos` must be 0, as Nix asserts.

use std::io::{self, Read, Write};

use crate::types::{wire_enum, Verbosity};
use crate::wire::{Field, Reader, WireError, WireResult, Writer};

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

wire_enum! {
    /// `ActivityType` (logging.hh).
    ActivityType: "activity type" {
        Unknown = 0, CopyPath = 100, FileTransfer = 101, Realise = 102, CopyPaths = 103,
        Builds = 104, Build = 105, OptimiseStore = 106, VerifyPaths = 107, Substitute = 108,
        QueryPathInfo = 109, PostBuildHook = 110, BuildWaiting = 111,
    }
}

wire_enum! {
    /// `ResultType` (logging.hh).
    ResultType: "result type" {
        FileLinked = 100, BuildLogLine = 101, UntrustedPath = 102, CorruptedPath = 103,
        SetPhase = 104, Progress = 105, SetExpected = 106, PostBuildLogLine = 107,
    }
}

/// An error as the daemon sends it (1.26+ form). Texts are bytes: they may hold builder
/// output, and Nix does not require UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub level: Verbosity,
    pub msg: Vec<u8>,
    /// The hints of the error's traces, outermost first.
    pub traces: Vec<Vec<u8>>,
}

impl RemoteError {
    /// An error at level Error without traces.
    pub fn new(msg: impl Into<Vec<u8>>) -> Self {
        Self {
            level: Verbosity::Error,
            msg: msg.into(),
            traces: Vec::new(),
        }
    }

    /// The message as text (lossy).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.msg).into_owned()
    }
}

/// One message on the stderr channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMsg {
    Next(Vec<u8>),
    Read(u64),
    Write(Vec<u8>),
    Last,
    Error(RemoteError),
    StartActivity {
        id: u64,
        level: Verbosity,
        kind: ActivityType,
        text: Vec<u8>,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity(u64),
    Result {
        id: u64,
        kind: ResultType,
        fields: Vec<Field>,
    },
}

impl StderrMsg {
    /// True for the two messages that end an operation.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Last | Self::Error(_))
    }

    /// Read one message.
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        let pos = r.position();
        let tag = r.read_u64("stderr message type")?;
        Ok(match tag {
            STDERR_NEXT => Self::Next(r.read_bytes("log line")?),
            STDERR_READ => Self::Read(r.read_u64("STDERR_READ length")?),
            STDERR_WRITE => Self::Write(r.read_bytes("STDERR_WRITE data")?),
            STDERR_LAST => Self::Last,
            STDERR_ERROR => {
                r.expect_string("Error", "error type")?;
                let level = Verbosity::read(r, "error level")?;
                let _name = r.read_bytes("error name")?;
                let msg = r.read_bytes("error message")?;
                expect_no_pos(r, "error position")?;
                let n = r.read_count("error traces")?;
                let mut traces = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    expect_no_pos(r, "trace position")?;
                    traces.push(r.read_bytes("trace hint")?);
                }
                Self::Error(RemoteError { level, msg, traces })
            }
            STDERR_START_ACTIVITY => Self::StartActivity {
                id: r.read_u64("activity id")?,
                level: Verbosity::read(r, "activity level")?,
                kind: ActivityType::read(r, "activity type")?,
                text: r.read_bytes("activity text")?,
                fields: r.read_fields("activity fields")?,
                parent: r.read_u64("activity parent")?,
            },
            STDERR_STOP_ACTIVITY => Self::StopActivity(r.read_u64("activity id")?),
            STDERR_RESULT => Self::Result {
                id: r.read_u64("activity id")?,
                kind: ResultType::read(r, "result type")?,
                fields: r.read_fields("result fields")?,
            },
            other => {
                return Err(WireError::Invalid {
                    pos,
                    what: "stderr message type",
                    message: format!("unknown message type 0x{other:x}"),
                })
            }
        })
    }

    /// Write one message.
    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        match self {
            Self::Next(s) => {
                w.write_u64(STDERR_NEXT)?;
                w.write_bytes(s)
            }
            Self::Read(n) => {
                w.write_u64(STDERR_READ)?;
                w.write_u64(*n)
            }
            Self::Write(s) => {
                w.write_u64(STDERR_WRITE)?;
                w.write_bytes(s)
            }
            Self::Last => w.write_u64(STDERR_LAST),
            Self::Error(e) => {
                w.write_u64(STDERR_ERROR)?;
                w.write_str("Error")?;
                w.write_u64(e.level.to_u64())?;
                w.write_str("Error")?;
                w.write_bytes(&e.msg)?;
                w.write_u64(0)?;
                w.write_u64(e.traces.len() as u64)?;
                for t in &e.traces {
                    w.write_u64(0)?;
                    w.write_bytes(t)?;
                }
                Ok(())
            }
            Self::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            } => {
                w.write_u64(STDERR_START_ACTIVITY)?;
                w.write_u64(*id)?;
                w.write_u64(level.to_u64())?;
                w.write_u64(kind.to_u64())?;
                w.write_bytes(text)?;
                w.write_fields(fields)?;
                w.write_u64(*parent)
            }
            Self::StopActivity(id) => {
                w.write_u64(STDERR_STOP_ACTIVITY)?;
                w.write_u64(*id)
            }
            Self::Result { id, kind, fields } => {
                w.write_u64(STDERR_RESULT)?;
                w.write_u64(*id)?;
                w.write_u64(kind.to_u64())?;
                w.write_fields(fields)
            }
        }
    }
}

fn expect_no_pos<R: Read>(r: &mut Reader<R>, what: &'static str) -> WireResult<()> {
    let pos = r.position();
    match r.read_u64(what)? {
        0 => Ok(()),
        v => Err(WireError::Invalid {
            pos,
            what,
            message: format!("positions are not sent by Nix 2.8 (havePos must be 0, got {v})"),
        }),
    }
}

/// Read messages up to and including the final one: returns the messages before it and
/// `Ok(())` for `STDERR_LAST` or `Err(error)` for `STDERR_ERROR`. `STDERR_READ` cannot
/// be answered here and is returned in the list like the others.
pub fn read_until_final<R: Read>(
    r: &mut Reader<R>,
) -> WireResult<(Vec<StderrMsg>, Result<(), RemoteError>)> {
    let mut msgs = Vec::new();
    loop {
        match StderrMsg::read(r)? {
            StderrMsg::Last => return Ok((msgs, Ok(()))),
            StderrMsg::Error(e) => return Ok((msgs, Err(e))),
            m => msgs.push(m),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            StderrMsg::Next(b"hello\n".to_vec()),
            StderrMsg::Read(32768),
            StderrMsg::Write(b"data".to_vec()),
            StderrMsg::StartActivity {
                id: 0x7346_0000_0001,
                level: Verbosity::Info,
                kind: ActivityType::Build,
                text: b"building '/nix/store/x.drv'".to_vec(),
                fields: vec![Field::from("/nix/store/x.drv"), Field::Int(1)],
                parent: 0,
            },
            StderrMsg::Result {
                id: 1,
                kind: ResultType::Progress,
                fields: vec![Field::Int(0), Field::Int(1)],
            },
            StderrMsg::StopActivity(1),
            StderrMsg::Error(RemoteError {
                level: Verbosity::Error,
                msg: b"boom".to_vec(),
                traces: vec![b"while x".to_vec()],
            }),
            StderrMsg::Last,
        ];
        let mut w = Writer::new(Vec::new());
        for m in &msgs {
            m.write(&mut w).unwrap();
        }
        let b = w.into_inner();
        let mut r = Reader::new(&b[..]);
        for m in &msgs {
            assert_eq!(&StderrMsg::read(&mut r).unwrap(), m);
        }
        assert_eq!(r.position(), b.len() as u64);
    }

    #[test]
    fn unknown_tags_and_types_are_errors() {
        let b = 0x1234u64.to_le_bytes();
        assert!(StderrMsg::read(&mut Reader::new(&b[..])).is_err());
        let mut w = Writer::new(Vec::new());
        w.write_u64(STDERR_RESULT).unwrap();
        w.write_u64(1).unwrap();
        w.write_u64(99).unwrap();
        let b = w.into_inner();
        let e = StderrMsg::read(&mut Reader::new(&b[..])).unwrap_err();
        assert!(e.to_string().contains("unknown result type 99"), "{e}");
        assert_eq!(
            ActivityType::from_u64(111),
            Some(ActivityType::BuildWaiting)
        );
        assert_eq!(ResultType::PostBuildLogLine.to_u64(), 107);
    }
}
