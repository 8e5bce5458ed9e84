//! `itw.v1.Ingest` as the agents see it on a relay: `Report` relayed to the
//! replica the `itw-replica` header names, `Relay` refused (relays do not
//! chain). The token was checked by the interceptor before this runs.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use itw_proto::itw::v1::{RelayRequest, RelayResponse, ReportRequest, ingest_server::Ingest};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};

use crate::{
    agent_stream::AgentStream,
    auth,
    config::Limits,
    metrics::{EndReason, RelayMetrics},
    replicas::{REPLICA_HEADER, Replicas},
};

/// Longest an agent's stream waits for the Relay stream to its replica to
/// come up (a replica just resolved, or one being reconnected) before it is
/// refused with UNAVAILABLE; the agent then retries with its backoff.
pub const UPSTREAM_WAIT: Duration = Duration::from_secs(3);

pub struct RelayService {
    replicas: Arc<Replicas>,
    streams: Arc<Semaphore>,
    limits: Limits,
    metrics: Arc<RelayMetrics>,
}

impl RelayService {
    pub fn new(replicas: Arc<Replicas>, limits: Limits, metrics: Arc<RelayMetrics>) -> Self {
        Self {
            replicas,
            streams: Arc::new(Semaphore::new(limits.max_agent_streams)),
            limits,
            metrics,
        }
    }

    fn refuse<T>(&self, request: &Request<T>, reason: EndReason, status: Status) -> Status {
        self.metrics.ended(reason);
        auth::refused(request, &status);
        status
    }
}

/// The replica an agent's stream names.
pub fn replica_header(metadata: &MetadataMap) -> Result<SocketAddr, Status> {
    let value = metadata.get(REPLICA_HEADER).ok_or_else(|| {
        Status::unavailable(format!(
            "a relayed stream needs the {REPLICA_HEADER} header (host:port of the scaler replica); set RELAY_ADDR and SCALER_ADDR on the agent"
        ))
    })?;
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<SocketAddr>().ok())
        .ok_or_else(|| {
            Status::unavailable(format!(
                "{REPLICA_HEADER}: {value:?} is not a replica address (ip:port, as resolved from SCALER_ADDR)"
            ))
        })
}

type RelayStream = Pin<Box<dyn Stream<Item = Result<RelayResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for RelayService {
    type ReportStream = AgentStream;
    type RelayStream = RelayStream;

    async fn report(
        &self,
        request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let addr = replica_header(request.metadata())
            .map_err(|status| self.refuse(&request, EndReason::UnknownReplica, status))?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            self.refuse(
                &request,
                EndReason::MaxAgentStreams,
                Status::resource_exhausted(format!(
                    "this relay carries at most {} agent streams (MAX_AGENT_STREAMS)",
                    self.limits.max_agent_streams
                )),
            )
        })?;
        let Some(replica) = self.replicas.find(addr).await else {
            return Err(self.refuse(
                &request,
                EndReason::UnknownReplica,
                Status::unavailable(format!(
                    "{REPLICA_HEADER}: {addr} is not a scaler replica this relay resolved from its SCALER_ADDR"
                )),
            ));
        };
        let Some(link) = replica.link(UPSTREAM_WAIT).await else {
            return Err(self.refuse(
                &request,
                EndReason::ReplicaUnreachable,
                Status::unavailable(format!(
                    "the relay has no stream to scaler replica {addr} yet; retry"
                )),
            ));
        };
        Ok(Response::new(AgentStream::new(
            link,
            request.into_inner(),
            self.limits.max_report_bytes,
            Arc::clone(&self.metrics),
            permit,
        )))
    }

    async fn relay(
        &self,
        _request: Request<Streaming<RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        Err(Status::unimplemented(
            "itw-relay takes agents' Report streams; Relay streams go to a scaler replica",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut map = MetadataMap::new();
        if let Some(v) = value {
            map.insert(REPLICA_HEADER, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn the_replica_header_is_an_ip_and_port() {
        assert_eq!(
            replica_header(&metadata(Some("10.244.1.5:9090"))).ok(),
            Some("10.244.1.5:9090".parse().unwrap())
        );
        assert_eq!(
            replica_header(&metadata(Some("[fd00::5]:9090"))).ok(),
            Some("[fd00::5]:9090".parse().unwrap())
        );
        let refused = |value: Option<&str>| {
            let status = replica_header(&metadata(value)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable);
            status.message().to_owned()
        };
        assert_eq!(
            refused(None),
            "a relayed stream needs the itw-replica header (host:port of the scaler replica); set RELAY_ADDR and SCALER_ADDR on the agent"
        );
        // A name would make the relay resolve what an agent chose: refused.
        assert_eq!(
            refused(Some("evil.example.com:443")),
            "itw-replica: \"evil.example.com:443\" is not a replica address (ip:port, as resolved from SCALER_ADDR)"
        );
        assert!(refused(Some("10.0.0.1")).starts_with("itw-replica: \"10.0.0.1\""));
    }
}
