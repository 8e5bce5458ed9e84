//! The guarded listener ([`crate::listener`]) as tonic's server takes it:
//! each connection under the guard, with its peer as tonic's connect info,
//! so every gRPC port bounds its connections and idle peers the same way.

use std::io;

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::listener::{GuardedListener, GuardedStream};

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

/// The listener's connections, for `serve_with_incoming`. The accept task
/// ends when the server drops the stream.
pub fn incoming(mut listener: GuardedListener) -> impl Stream<Item = io::Result<GuardedStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept_guarded().await;
            if tx.send(Ok(stream)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
