//! The control thread: a one-thread runtime apart from the workers, for what must keep
//! answering when a worker thread is kept by a task: the accept loop, the `/metrics`
//! endpoint and the admin console. Sessions are handed to the workers once accepted.

use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The control thread; its runtime stops, and its tasks with it, when this is dropped.
#[derive(Debug)]
pub struct ControlThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl ControlThread {
    pub fn start() -> std::io::Result<Arc<ControlThread>> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pgrelay-control".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Arc::new(ControlThread {
            handle,
            stop: Some(stop),
        }))
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
