//! The one handle every fake returns: where it listens, its state, and its
//! server task, which stops when the handle is stopped or dropped. A panic
//! of the server task itself (its accept loop) is not lost: `stop` and
//! `join` raise it again in the test that holds the handle. A panic in one
//! request's handler stays in that request's task, as the HTTP and DNS
//! servers run each in a task of their own; the request then fails.

use std::net::SocketAddr;

use futures::FutureExt as _;
use tokio::task::JoinHandle;

/// A running fake with state `S`; the fakes' own methods (faults, counters)
/// are on `Listening<their state>`.
#[derive(Debug)]
pub struct Listening<S> {
    /// Where it listens.
    pub addr: SocketAddr,
    pub(crate) state: S,
    task: Option<JoinHandle<()>>,
    https: bool,
}

impl<S> Listening<S> {
    /// Serves `server` from a task of its own.
    pub(crate) fn spawn(
        addr: SocketAddr,
        state: S,
        server: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self {
            addr,
            state,
            task: Some(tokio::spawn(server)),
            https: false,
        }
    }

    /// Marks it as serving HTTPS (for [`url`](Self::url)).
    pub(crate) fn https(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// `http://addr` (or `https://`), for the HTTP fakes.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops serving. Raises the server task's panic if it had one.
    pub fn stop(mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        if !task.is_finished() {
            task.abort();
        } else if let Some(Err(error)) = task.now_or_never()
            && error.is_panic()
        {
            std::panic::resume_unwind(error.into_panic());
        }
    }

    /// Waits until the server task ends (it only ends by panicking, or by
    /// erroring out of its listener), raising its panic.
    pub async fn join(mut self) {
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
            && error.is_panic()
        {
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

impl<S> Drop for Listening<S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_the_server_reaches_the_test() {
        let handle = Listening::spawn("127.0.0.1:1".parse().unwrap(), (), async {
            panic!("the fake broke");
        });
        let joined = tokio::spawn(handle.join()).await;
        let panic = joined.expect_err("join raised the panic").into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"the fake broke"));
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_server() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = Listening::spawn("127.0.0.1:1".parse().unwrap(), (), async move {
            let _alive = tx;
            std::future::pending::<()>().await;
        });
        drop(handle);
        // The task, and the sender it held, are gone.
        assert!(rx.await.is_err());
    }
}
