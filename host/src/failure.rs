//! A file that failed for good. redb fails every operation after one whose
//! write or flush failed (a full disk, a file-size limit, an I/O error), as
//! what is on disk is unknown until the file is opened again: the host must
//! stop, for its service manager to start it again. The first failure is
//! kept, for the host to stop on and to say why.

use tokio::sync::watch;

pub struct FileFailure(watch::Sender<Option<String>>);

impl Default for FileFailure {
    fn default() -> Self {
        FileFailure(watch::channel(None).0)
    }
}

impl FileFailure {
    /// Records the failure `why` describes, unless one is recorded already;
    /// `first` runs (to log it) only then.
    pub fn record(&self, why: impl FnOnce() -> String, first: impl FnOnce(&str)) {
        self.0.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            let why = why();
            first(&why);
            *failure = Some(why);
            true
        });
    }

    /// Why the file failed, once it has.
    pub fn get(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Returns why, once the file has failed.
    pub async fn wait(&self) -> String {
        let mut failure = self.0.subscribe();
        let why = failure
            .wait_for(Option::is_some)
            .await
            .map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            // `self` holds the sender: the channel stays open while this waits.
            Err(_) => std::future::pending().await,
        }
    }
}
