//! What the agent's DaemonSet gives it, read from `deploy/base` (built into
//! the lab, so the lab runs the agent exactly as the manifest of the same
//! commit would): its env, with the downward API's fields filled in as the
//! kubelet would, and its added capabilities.

use anyhow::{Context, bail};
use serde_json::Value;

const MANIFEST: &str = include_str!("../../../deploy/base/agent-daemonset.yaml");

/// The agent container's settings.
#[derive(Clone, Debug)]
pub struct AgentPod {
    /// `(name, value)`, in the manifest's order.
    pub env: Vec<(String, String)>,
    /// As setpriv names them: `bpf`, `perfmon`, ...
    pub capabilities: Vec<String>,
}

/// The downward API's values on the lab node.
pub struct Downward<'a> {
    pub node_name: &'a str,
    pub host_ip: &'a str,
}

pub fn agent_pod(downward: &Downward<'_>) -> anyhow::Result<AgentPod> {
    let daemonset: Value =
        serde_saphyr::from_str(MANIFEST).context("parsing deploy/base/agent-daemonset.yaml")?;
    let container = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "itw-agent"))
        .context("the DaemonSet has no itw-agent container")?;
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"]
            .as_str()
            .context("an env entry without a name")?;
        let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(value), _) => value.clone(),
            (_, Value::String(field)) => match field.as_str() {
                "spec.nodeName" => downward.node_name.to_owned(),
                "status.hostIP" => downward.host_ip.to_owned(),
                other => bail!("env {name}: the lab does not fill the downward API field {other}"),
            },
            _ => bail!("env {name}: neither a value nor a fieldRef the lab knows"),
        };
        env.push((name.to_owned(), value));
    }
    let capabilities = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("the agent container adds no capabilities")?
        .iter()
        .filter_map(Value::as_str)
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    Ok(AgentPod { env, capabilities })
}

impl AgentPod {
    /// Sets (or adds) one env var, as a cluster overlay would.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.env.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.env.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_manifests_env_and_capabilities() {
        let pod = agent_pod(&Downward {
            node_name: "lab-node",
            host_ip: "10.0.0.10",
        })
        .expect("the DaemonSet");
        assert_eq!(pod.get("NODE_NAME"), Some("lab-node"));
        assert_eq!(pod.get("HOLD_PARK_ADDR"), Some("10.0.0.10"));
        assert_eq!(pod.get("CGROUP_ROOT"), Some("/host/sys/fs/cgroup"));
        assert_eq!(pod.get("HOLD_NETNS_DIR"), Some("/host/run/netns"));
        assert_eq!(pod.capabilities, ["net_admin", "sys_admin"], "{pod:?}");
    }
}
