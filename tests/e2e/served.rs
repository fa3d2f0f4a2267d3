//! Every metric of the node served where operators read it, without Kafka:
//! a real Prometheus server (Debian's package) scrapes the collector, which
//! polls the simulator's agent, reads the node, and takes a task's own
//! metrics on its TCP input; Prometheus's query API and the v0 API answer
//! with the task metadata and labels the agent's `/state` gave.

use std::collections::BTreeMap;

use e2e::prometheus::{
    PrometheusServer, agent_tasks, mem_total_bytes, only_value, scrape_failures, selector,
};
use e2e::{assert_balanced, eventually, spawn_collector, test_config};
use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};
use serde_json::Value;
use simulator::agent::mesos_agent;
use tokio::io::AsyncWriteExt;

/// Whether the v0 message at `url` has the dimension `task_name` equal to
/// `task_name`; otherwise what it had.
async fn v0_task_name(url: String, task_name: &str) -> Result<(), String> {
    let answer = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let message: Value = answer.json().await.map_err(|e| e.to_string())?;
    (message["dimensions"]["task_name"] == task_name)
        .then_some(())
        .ok_or_else(|| format!("{message}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_v0_carry_each_containers_task_name_and_labels_without_kafka() {
    let agent = mesos_agent().containers(3).run().await.unwrap();
    let mut config = test_config("127.0.0.1:1");
    config.kafka = false;
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    config.node_metrics = true;
    // One node poll in the test: the first waits for the agent's /state,
    // so that the node's series carry its id from the start (series
    // recorded before /state are forgotten once it answers).
    config.node_poll_period = 3600;
    config.prometheus_listen = "127.0.0.1:0".parse().unwrap();
    config.metrics_api_listen = "127.0.0.1:0".parse().unwrap();
    let collector = spawn_collector(config).await;
    let target = collector.prometheus.expect("Prometheus on");
    let v0 = format!("http://{}", collector.metrics_api.clone().expect("v0 on"));
    let containers = agent_tasks(&agent.url()).await;
    assert_eq!(containers.len(), 3, "{containers:?}");
    // The collector has read the agent's state (records read before it are
    // forgotten once it answers): the first container's statistics carry
    // their task's name.
    let (first, task) = containers.iter().next().unwrap();
    eventually("the agent's state read", || {
        v0_task_name(format!("{v0}/v0/containers/{first}"), &task.task_name)
    })
    .await;

    // A task's own metric, sent as the module sends it: its container's id
    // is what ties it to the task.
    let mut encoder = OcfEncoder::new(Codec::Null);
    let mut bytes = encoder.header().to_vec();
    encoder.write_block(
        &[MetricList {
            topic: task.framework_id.clone(),
            tags: vec![
                Tag::new("container_id", first),
                Tag::new("executor_id", &task.executor_id),
                Tag::new("framework_id", &task.framework_id),
            ],
            datapoints: vec![Datapoint::new("app.requests", 1_000, 42.0)],
        }],
        &mut bytes,
    );
    let mut input = tokio::net::TcpStream::connect(collector.addr)
        .await
        .unwrap();
    input.write_all(&bytes).await.unwrap();
    input.shutdown().await.unwrap();

    let prometheus = PrometheusServer::start(&[target]).await;
    eventually("Prometheus scraped the collector", || async {
        let up = only_value(&prometheus.query("up{job=\"collector\"}").await);
        (up == Some(1.0)).then_some(()).ok_or(format!("{up:?}"))
    })
    .await;

    // Every container's metric, asked by its task's name, has the value the
    // agent served, and the executor's labels but Cosmos's.
    for (container, want) in &containers {
        let query = selector(
            "dcos_metrics_container_mem_limit_bytes",
            &[("task_name", &want.task_name), ("container_id", container)],
        );
        let sample = eventually(&query, || async {
            let result = prometheus.query(&query).await;
            match result.as_slice() {
                [sample] => Ok(sample.clone()),
                _ => Err(format!("{result:?}")),
            }
        })
        .await;
        assert_eq!(
            sample["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
            want.mem_limit_bytes
        );
        let labels = &sample["metric"];
        assert_eq!(labels["task_id"], want.task_id.as_str());
        assert_eq!(labels["framework_role"], want.role.as_str());
        for (key, value) in &want.labels {
            assert_eq!(labels[key.as_str()], value.as_str(), "{key}: {labels}");
        }
        assert!(
            labels.get("DCOS_PACKAGE_FRAMEWORK_NAME").is_none()
                && labels["SIM_LABELLED_BY"] == "executor",
            "{labels}"
        );
    }

    // The task's own metric carries its task's name and labels.
    let query = selector("app_requests", &[("task_name", &task.task_name)]);
    let app = eventually(&query, || async {
        let result = prometheus.query(&query).await;
        match result.as_slice() {
            [sample] => Ok(sample.clone()),
            _ => Err(format!("{result:?}")),
        }
    })
    .await;
    assert_eq!(app["value"][1], "42");
    assert_eq!(app["metric"]["task_id"], task.task_id.as_str());
    assert_eq!(app["metric"]["DCOS_SERVICE_NAME"], task.task_name.as_str());
    assert_eq!(
        app["metric"]["SIM_LABELLED_BY"], "task",
        "the task's labels"
    );

    // A node metric: the node's memory as the kernel says it, with the
    // agent's id.
    let state: Value = reqwest::get(format!("{}/state", agent.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let agent_id = state["id"].as_str().unwrap();
    let query = selector("memory_total", &[("agent_id", agent_id)]);
    let memory = eventually(&query, || async {
        only_value(&prometheus.query(&query).await).ok_or_else(|| "none".to_owned())
    })
    .await;
    assert_eq!(memory, mem_total_bytes());

    // The v0 API: the container's message has the task's dimensions and the
    // executor's labels; the app message's datapoints carry the task's.
    let message: Value = reqwest::get(format!("{v0}/v0/containers/{first}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dimensions = &message["dimensions"];
    assert_eq!(dimensions["task_name"], task.task_name.as_str());
    assert_eq!(dimensions["task_id"], task.task_id.as_str());
    assert_eq!(dimensions["framework_role"], task.role.as_str());
    let labels: BTreeMap<String, String> =
        serde_json::from_value(dimensions["labels"].clone()).unwrap();
    assert_eq!(labels, task.labels);
    for point in message["datapoints"].as_array().unwrap() {
        assert!(
            point["tags"].get("DCOS_SERVICE_NAME").is_none(),
            "the labels are in the dimensions: {point}"
        );
    }
    let app: Value = reqwest::get(format!("{v0}/v0/containers/{first}/app"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(app["dimensions"]["task_name"], task.task_name.as_str());
    assert_eq!(
        app["datapoints"][0]["tags"]["DCOS_SERVICE_NAME"],
        task.task_name.as_str()
    );

    for (failure, value) in scrape_failures(&format!("http://{}", prometheus.addr)).await {
        assert_eq!(value, 0.0, "{failure}");
    }
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    // Without Kafka, every datapoint is served (or dropped and counted);
    // none is said to be delivered.
    assert_eq!(accounting.delivered.datapoints, 0, "{accounting:?}");
    assert_eq!(accounting.dropped_total().datapoints, 0, "{accounting:?}");
    assert_eq!(
        accounting.served.datapoints, accounting.received.datapoints,
        "{accounting:?}"
    );
}

/// A task started after the agent's `/state` was read: its first app
/// metric names a container the state does not know, which fetches
/// `/state` again at once (the agent is polled once an hour here), and its
/// metrics then carry its task's name; the series recorded before, without
/// it, is forgotten then, not served beside it until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tasks_metrics_get_its_name_without_waiting_for_the_next_poll() {
    let agent = mesos_agent().containers(1).run().await.unwrap();
    let mut config = test_config("127.0.0.1:1");
    config.kafka = false;
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 3600;
    config.metrics_api_listen = "127.0.0.1:0".parse().unwrap();
    config.prometheus_listen = "127.0.0.1:0".parse().unwrap();
    let collector = spawn_collector(config).await;
    let v0 = format!("http://{}", collector.metrics_api.clone().expect("v0 on"));
    let scrape = format!(
        "http://{}/metrics",
        collector.prometheus.expect("Prometheus on")
    );
    let first = agent_tasks(&agent.url()).await;
    let (first_id, first_task) = first.iter().next().unwrap();
    eventually("the agent's state read", || {
        v0_task_name(
            format!("{v0}/v0/containers/{first_id}"),
            &first_task.task_name,
        )
    })
    .await;

    // A second task starts; its module sends its metrics.
    agent.set_containers(2);
    let tasks = agent_tasks(&agent.url()).await;
    let (id, task) = tasks
        .iter()
        .find(|(id, _)| !first.contains_key(*id))
        .expect("a new container");
    let mut value = 0.0;
    eventually("the new task's name on its app metrics", || {
        // One record a try, on a connection of its own, as a module sends
        // it: the series keeps the tags of its latest record.
        value += 1.0;
        let mut encoder = OcfEncoder::new(Codec::Null);
        let mut bytes = encoder.header().to_vec();
        encoder.write_block(
            &[MetricList {
                topic: task.framework_id.clone(),
                tags: vec![
                    Tag::new("container_id", id),
                    Tag::new("executor_id", &task.executor_id),
                    Tag::new("framework_id", &task.framework_id),
                ],
                // Its own time, as a task's: of the series the store holds
                // for it (with and without its task's tags), v0 gives the
                // newest.
                datapoints: vec![Datapoint::new("app.requests", 1_000 + value as i64, value)],
            }],
            &mut bytes,
        );
        let (addr, v0) = (collector.addr, &v0);
        async move {
            let mut input = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            input.write_all(&bytes).await.map_err(|e| e.to_string())?;
            input.shutdown().await.map_err(|e| e.to_string())?;
            v0_task_name(format!("{v0}/v0/containers/{id}/app"), &task.task_name).await
        }
    })
    .await;
    eventually(
        "one series of the app metric, with its task's name",
        || async {
            let text = reqwest::get(&scrape)
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            let samples: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("app_requests{"))
                .collect();
            let named = format!("task_name=\"{}\"", task.task_name);
            (samples.len() == 1 && samples[0].contains(&named))
                .then_some(())
                .ok_or_else(|| format!("{samples:?}"))
        },
    )
    .await;
    let counts = collector.shutdown().await;
    assert_balanced(&counts);
}
