//! `itw.v1.Graph`: the dependency graph, read-only, for people and scripts
//! (`grpcurl -plaintext scaler:9090 itw.v1.Graph/ListEdges`).
//!
//! Who may read: whoever may call the KEDA service on the same port. The
//! graph says which Services call which, what the scaler's /metrics already
//! says by Service name; no agent token is asked (KEDA and grpcurl users do
//! not hold it), and with TLS_CLIENT_CA_FILE every caller of the port needs
//! a client certificate, this service included. It never changes anything.

use std::sync::Arc;

use itw_proto::{
    itw::v1::{self, ListEdgesRequest, ListEdgesResponse, graph_server},
    names,
};
use tonic::{Request, Response, Status};

use crate::store::Store;

pub struct GraphService {
    store: Arc<Store>,
}

impl GraphService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl graph_server::Graph for GraphService {
    async fn list_edges(
        &self,
        request: Request<ListEdgesRequest>,
    ) -> Result<Response<ListEdgesResponse>, Status> {
        let namespace = request.into_inner().namespace;
        let filter = if namespace.is_empty() {
            None
        } else {
            names::namespace(&namespace).map_err(|problem| {
                Status::invalid_argument(format!(
                    "namespace = {}: {problem}",
                    crate::trigger::shown(&namespace)
                ))
            })?;
            Some(namespace.as_str())
        };
        let now_ms = self.store.clock().now_ms();
        let edges = self
            .store
            .graph()
            .list(filter, now_ms)
            .into_iter()
            .map(|e| v1::Edge {
                from_namespace: e.from.namespace.to_string(),
                from_service: e.from.service.to_string(),
                to_namespace: e.to.namespace.to_string(),
                to_service: e.to.service.to_string(),
                last_seen_unix_ms: e.last_seen_ms,
                declared: e.declared,
            })
            .collect();
        Ok(Response::new(ListEdgesResponse { edges }))
    }
}
