//! The stream cost layers with the agents brought by `--relays` Relay
//! streams: relay `r` carries agents r, r + R, r + 2R, ... as relayed
//! streams numbered from 1, sends one message for each of them and reads
//! every answer before the next layer, as a relay would pass them on.

use anyhow::bail;
use itw_proto::itw::v1::{
    RelayRequest, RelayResponse, ReportRequest, ingest_client::IngestClient, relay_request,
    relay_response, report_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Args, Readings, agent_batch, agent_snapshot, bench_support::connect, for_each, hello};

/// Envelopes queued towards the scaler before the sender waits.
const QUEUE: usize = 64;

/// One relay's Relay call and the agents it carries.
struct RelayCall {
    tx: mpsc::Sender<RelayRequest>,
    answers: tonic::Streaming<RelayResponse>,
    /// The agents carried: (relayed stream number, agent index).
    agents: Vec<(u64, usize)>,
}

impl RelayCall {
    async fn open(channel: Channel, agents: Vec<(u64, usize)>) -> anyhow::Result<Self> {
        let mut client = IngestClient::new(channel);
        let (tx, rx) = mpsc::channel(QUEUE);
        let answers = client.relay(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            tx,
            answers,
            agents,
        })
    }

    /// Sends each agent's message of this round and reads every answer,
    /// sending and reading at once as a relay does.
    async fn round(
        &mut self,
        message: impl Fn(usize) -> report_request::Message,
    ) -> anyhow::Result<()> {
        let envelopes: Vec<RelayRequest> = self
            .agents
            .iter()
            .map(|&(stream, agent)| RelayRequest {
                stream,
                message: Some(relay_request::Message::Report(ReportRequest {
                    message: Some(message(agent)),
                })),
            })
            .collect();
        let expected = envelopes.len();
        let tx = self.tx.clone();
        let send = async move {
            for envelope in envelopes {
                tx.send(envelope).await?;
            }
            anyhow::Ok(())
        };
        let answers = &mut self.answers;
        let read = async move {
            for _ in 0..expected {
                match answers.message().await? {
                    Some(RelayResponse {
                        message: Some(relay_response::Message::Report(_)),
                        ..
                    }) => {}
                    other => bail!("expected an answer, got {other:?}"),
                }
            }
            anyhow::Ok(())
        };
        tokio::try_join!(send, read)?;
        Ok(())
    }
}

pub async fn layers(args: &Args, readings: &mut Readings) -> anyhow::Result<()> {
    let grpc = args.scaler.grpc;
    let relays = args.relays;
    let channels = for_each((0..relays).collect(), |_, _| connect(grpc)).await?;
    readings
        .read(&format!("1. HTTP/2 connections ({relays} relays)"))
        .await?;

    let calls = for_each(channels, |r, channel| async move {
        let agents = (r..args.streams)
            .step_by(relays)
            .zip(1..)
            .map(|(agent, stream)| (stream, agent))
            .collect();
        let mut call = RelayCall::open(channel.clone(), agents).await?;
        call.round(|agent| hello(&format!("node-{agent:05}"), "streamcost"))
            .await?;
        Ok((channel, call))
    })
    .await?;
    readings
        .read("2. Relay calls, relayed hellos (welcome)")
        .await?;

    let calls = for_each(calls, |_, (channel, mut call)| async move {
        call.round(|agent| agent_snapshot(args, agent)).await?;
        Ok((channel, call))
    })
    .await?;
    readings.read("3. snapshots").await?;

    let mut calls = calls;
    for sequence in 1..=args.batches {
        calls = for_each(calls, |_, (channel, mut call)| async move {
            call.round(|agent| agent_batch(args, agent, sequence))
                .await?;
            Ok((channel, call))
        })
        .await?;
    }
    readings.read("4. batches").await?;

    let channels: Vec<Channel> = calls.into_iter().map(|(channel, _call)| channel).collect();
    readings
        .read("5. Relay calls ended (connections kept)")
        .await?;
    drop(channels);
    readings.read("6. connections closed").await?;
    Ok(())
}
