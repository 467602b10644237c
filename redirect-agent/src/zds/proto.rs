//! ZDS's messages, as they travel: one protobuf message per datagram.
//!
//! Written from the wire format of istio's `pkg/zdsapi/zds.proto` (package `istio.workload.zds`),
//! with prost's derive macros rather than generated code. Field numbers are the protocol: a
//! test in `zds::tests` checks each message against bytes written out by hand.

/// The protocol version ztunnel speaks, in its [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// ztunnel's first message on a connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// A Windows pod's namespace (unused on Linux; carried so the message is whole).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WindowsNamespace {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(string, tag = "2")]
    pub guid: String,
}

/// Who the pod is, for ztunnel's identity and metrics. Tag 4 is reserved.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
    #[prost(message, optional, tag = "5")]
    pub windows_namespace: Option<WindowsNamespace>,
}

/// A pod to serve; its network namespace travels with the datagram (one SCM_RIGHTS descriptor).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// A pod ztunnel should keep serving without a namespace (not sent by this agent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// A pod to stop serving. The uid is field 2, not 1.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The end of the snapshot that opens each connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// What the node agent sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// ztunnel's answer to one request: an empty `error` acks it, any other is a NACK.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// What ztunnel sends after its hello: one per request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

impl WorkloadRequest {
    pub fn add(uid: &str, info: WorkloadInfo) -> Self {
        Self::of(workload_request::Payload::Add(AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info),
        }))
    }

    pub fn del(uid: &str) -> Self {
        Self::of(workload_request::Payload::Del(DelWorkload { uid: uid.to_owned() }))
    }

    pub fn snapshot_sent() -> Self {
        Self::of(workload_request::Payload::SnapshotSent(SnapshotSent {}))
    }

    fn of(payload: workload_request::Payload) -> Self {
        Self { payload: Some(payload) }
    }

    /// The message's name in the protocol, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self.payload {
            Some(workload_request::Payload::Add(_)) => "AddWorkload",
            Some(workload_request::Payload::Del(_)) => "DelWorkload",
            Some(workload_request::Payload::SnapshotSent(_)) => "SnapshotSent",
            Some(workload_request::Payload::Keep(_)) => "KeepWorkload",
            None => "an empty WorkloadRequest",
        }
    }
}
