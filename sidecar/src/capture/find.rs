//! Which container to commit: this pod's graphical container, found by the
//! kubelet's labels through containerd's API (never by a name match across the
//! node), the one with a running task when restarts left several.

use crate::ctrd::Ctrd;
use anyhow::{bail, Context, Result};
use containerd_client::services::v1::{
    Container, GetRequest as GetTaskRequest, ListContainersRequest,
};

/// Task status RUNNING in containerd's API.
const RUNNING: i32 = 2;

pub struct Identity<'a> {
    pub pod_uid: &'a str,
    pub pod_name: &'a str,
    pub pod_namespace: &'a str,
    pub container: &'a str,
}

/// containerd filters for `identity` (labels with dots must be quoted).
pub fn filters(id: &Identity<'_>) -> Vec<String> {
    let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let name = format!(
        "labels.\"io.kubernetes.container.name\"==\"{}\"",
        q(id.container)
    );
    if !id.pod_uid.is_empty() {
        vec![format!(
            "labels.\"io.kubernetes.pod.uid\"==\"{}\",{name}",
            q(id.pod_uid)
        )]
    } else {
        vec![format!(
            "labels.\"io.kubernetes.pod.name\"==\"{}\",labels.\"io.kubernetes.pod.namespace\"==\"{}\",{name}",
            q(id.pod_name),
            q(id.pod_namespace)
        )]
    }
}

pub async fn container(ctrd: &Ctrd, id: &Identity<'_>) -> Result<Container> {
    let found = ctrd
        .client
        .containers()
        .list(ctrd.req(ListContainersRequest {
            filters: filters(id),
        }))
        .await
        .context("listing containers")?
        .into_inner()
        .containers;
    if found.is_empty() {
        bail!(
            "no container {:?} of pod {} (uid {:?}) in containerd namespace {}",
            id.container,
            id.pod_name,
            id.pod_uid,
            ctrd.namespace
        );
    }
    let mut running = Vec::new();
    for c in found {
        let task = ctrd
            .client
            .tasks()
            .get(ctrd.req(GetTaskRequest {
                container_id: c.id.clone(),
                exec_id: String::new(),
            }))
            .await;
        if matches!(&task, Ok(t) if t.get_ref().process.as_ref().is_some_and(|p| p.status == RUNNING))
        {
            running.push(c);
        }
    }
    match running.len() {
        1 => Ok(running.remove(0)),
        0 => bail!(
            "container {:?} of pod {} has no running task",
            id.container,
            id.pod_name
        ),
        n => bail!(
            "{n} running containers {:?} of pod {}: refusing to guess",
            id.container,
            id.pod_name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_uid_or_by_name_and_namespace() {
        let by_uid = Identity {
            pod_uid: "u-1",
            pod_name: "p",
            pod_namespace: "ns",
            container: "x-graphical",
        };
        assert_eq!(
            filters(&by_uid),
            vec!["labels.\"io.kubernetes.pod.uid\"==\"u-1\",labels.\"io.kubernetes.container.name\"==\"x-graphical\""]
        );
        let by_name = Identity {
            pod_uid: "",
            ..by_uid
        };
        assert!(filters(&by_name)[0].contains("labels.\"io.kubernetes.pod.namespace\"==\"ns\""));
    }
}
