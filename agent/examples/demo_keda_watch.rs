//! Plays KEDA for `hack/demo`: holds a `StreamIsActive` stream open for one
//! Service, as KEDA does for a ScaledObject of type `external-push`, prints
//! every message with how long after the client's first connect it came, and
//! polls `GetMetrics` every second like KEDA's polling loop.
//!
//! Usage: demo_keda_watch SCALER_ADDR NAMESPACE SERVICE FIRST_CONNECT_FILE

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use itw_proto::externalscaler::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, scaler, namespace, service, first_connect_file] = args.as_slice() else {
        eprintln!("usage: demo_keda_watch SCALER_ADDR NAMESPACE SERVICE FIRST_CONNECT_FILE");
        std::process::exit(2);
    };
    let object = ScaledObjectRef {
        name: format!("{service}-scaler"),
        namespace: namespace.clone(),
        scaler_metadata: HashMap::from([
            ("scalerAddress".to_owned(), scaler.clone()),
            ("service".to_owned(), service.clone()),
            ("window".to_owned(), "10s".to_owned()),
            ("targetRate".to_owned(), "1".to_owned()),
        ]),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{scaler}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = ExternalScalerClient::new(channel);
    let mut stream = client.stream_is_active(object.clone()).await?.into_inner();
    println!(
        "  keda   | StreamIsActive open for {namespace}/{service} (as KEDA does for an external-push ScaledObject)"
    );

    let mut poller = client.clone();
    let metric_name = format!("itw-{namespace}-{service}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = None;
        loop {
            tick.tick().await;
            let request = GetMetricsRequest {
                scaled_object_ref: Some(object.clone()),
                metric_name: metric_name.clone(),
            };
            if let Ok(response) = poller.get_metrics(request).await {
                let rate = response
                    .into_inner()
                    .metric_values
                    .first()
                    .map_or(0.0, |v| v.metric_value_float);
                if last != Some(rate) {
                    println!("  keda   | GetMetrics: {rate:.2} attempts/s over the last 10s");
                    last = Some(rate);
                }
            }
        }
    });

    while let Some(message) = stream.message().await? {
        let now = unix_ns();
        let since = std::fs::read_to_string(first_connect_file)
            .ok()
            .and_then(|s| s.trim().parse::<u128>().ok())
            .map(|first| {
                format!(
                    " ({:.3} ms after the first connect)",
                    (now - first) as f64 / 1e6
                )
            });
        if message.result {
            println!(
                "  keda   | >>> StreamIsActive: true  => KEDA scales the Deployment 0 -> 1 now{}",
                since.unwrap_or_default()
            );
        } else {
            println!("  keda   | StreamIsActive: false (idle)");
        }
    }
    Ok(())
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
