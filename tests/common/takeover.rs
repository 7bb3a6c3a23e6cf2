//! Helpers of the takeover tests that run pgrelay as processes: a config with a takeover
//! socket, the old process started and waited for, what its log says, and clients.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgrelay::localpg::LocalCluster;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

use super::process::Process;

pub fn url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=5")
}

/// A config in `dir` for `pool` on `port`, with a takeover socket and the admin console;
/// returns its path and the socket's.
pub fn write_config(cluster: &LocalCluster, dir: &Path, port: u16, pool: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("takeover.sock");
    let config = super::config_for(cluster, pool).replacen(
        "listen = \"LISTEN\"",
        &format!(
            "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\ntakeover_socket = \"{}\"\n\
             admin_users = [\"app\"]",
            socket.display()
        ),
        1,
    );
    let path = dir.join("pgrelay.toml");
    std::fs::write(&path, config).unwrap();
    (path, socket)
}

/// Makes `LISTEN` pin its client to a server connection (`listen_notify = "pin"`)
/// instead of the fan-out, in the config file `write_config` wrote.
pub fn pin_listeners(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replacen("[databases.app]\n", "[databases.app]\nlisten_notify = \"pin\"\n", 1),
    )
    .unwrap();
}

pub async fn start_old(config: &Path, dir: &Path, port: u16) -> Process {
    let old = Process::start(config, None, dir.join("old.log"));
    super::wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    old
}

/// Clients the old process's log says it handed over with their server connection.
pub fn handed_over_with_server(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("client handed over to the new process") && line.contains("with_server=true"))
        .count()
}

pub async fn backend_pid(client: &Client) -> String {
    super::first_value(&client.simple_query("SELECT pg_backend_pid()").await.unwrap())
}

/// The rows of an admin console command, as name → value maps.
pub async fn admin_rows(port: u16, command: &str) -> Vec<std::collections::HashMap<String, String>> {
    let admin = super::connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=pgrelay connect_timeout=5"
    ))
    .await
    .unwrap();
    admin
        .simple_query(command)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(index, column)| (column.name().to_owned(), row.get(index).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Waits until SHOW SERVERS lists the server session `pid` as idle in its pool.
pub async fn wait_idle_in_pool(port: u16, pid: &str, what: &str) {
    super::wait_until(what, Duration::from_secs(10), || async {
        admin_rows(port, "SHOW SERVERS")
            .await
            .iter()
            .any(|row| row["remote_pid"] == pid && row["state"] == "idle")
    })
    .await;
}

/// A client whose notifications come out of a channel.
pub async fn listening_client(url: &str) -> (Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (sender, messages) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if sender.send(message).is_err() {
                break;
            }
        }
    });
    (client, messages)
}

/// The next notification out of `notifications` (other messages passed over), as (channel,
/// payload); fails after 10 s.
pub async fn next_notification(
    notifications: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) -> (String, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
            .await
            .expect("a notification within 10 s")
            .expect("the listening client's connection ended");
        if let AsyncMessage::Notification(notification) = message {
            return (notification.channel().to_owned(), notification.payload().to_owned());
        }
    }
}
