//! Where a paged reconcile's pages come from: a source's listing sends each
//! page as it reads it, so that the host holds a few pages rather than the
//! inventory; a list held whole is sent the same way ([`send_list`]).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::event::Vm;

/// VMs in one page of `inventory.next-page` when the host holds the whole
/// list: Prism's own page size.
pub const INVENTORY_PAGE: usize = 500;

/// Pages a listing may read ahead of the slowest plugin it feeds.
const AHEAD: usize = 2;

/// What a listing sends a paged reconcile, in order.
#[derive(Debug, Clone)]
pub enum Feed {
    Page(Arc<Vec<Vm>>),
    /// Every VM was sent: `next-page` answers `none`.
    End,
    /// The listing broke off. The call ends in an error rather than with a
    /// `none`, which the plugin would take for the whole inventory and
    /// remove every VM it did not see.
    Failed(Arc<str>),
}

/// The listing's end of a feed.
pub type FeedSender = mpsc::Sender<Feed>;

/// Why `next-page` has no page to give.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    #[error("the inventory could not be read to its end: {0}")]
    Failed(Arc<str>),
    #[error("the inventory's listing stopped before its end")]
    Abandoned,
}

/// The inventory of one paged reconcile call, as its listing sends it.
pub struct Inventory {
    pages: mpsc::Receiver<Feed>,
    ended: bool,
}

impl Inventory {
    /// A feed and the inventory that reads it.
    pub fn fed() -> (FeedSender, Inventory) {
        let (tx, pages) = mpsc::channel(AHEAD);
        let inventory = Inventory {
            pages,
            ended: false,
        };
        (tx, inventory)
    }

    /// The next page, `None` once every VM was handed out (and after that).
    pub async fn next(&mut self) -> Result<Option<Arc<Vec<Vm>>>, FeedError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            match self.pages.recv().await {
                // An empty page says nothing; the plugin is told `none` only
                // at the end.
                Some(Feed::Page(vms)) if vms.is_empty() => continue,
                Some(Feed::Page(vms)) => return Ok(Some(vms)),
                Some(Feed::End) => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Feed::Failed(reason)) => return Err(FeedError::Failed(reason)),
                None => return Err(FeedError::Abandoned),
            }
        }
    }
}

/// Sends a list its caller holds whole, [`INVENTORY_PAGE`] VMs at a time,
/// then its end; stops early once the call reading it has ended.
pub async fn send_list(feed: FeedSender, vms: &[Vm]) {
    for page in vms.chunks(INVENTORY_PAGE) {
        if feed
            .send(Feed::Page(Arc::new(page.to_vec())))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = feed.send(Feed::End).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(n: usize) -> Arc<Vec<Vm>> {
        Arc::new(
            (0..n)
                .map(|i| Vm {
                    uuid: format!("vm-{i}"),
                    ..Default::default()
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_list_is_sent_in_pages_of_five_hundred_then_its_end() {
        let (tx, mut inventory) = Inventory::fed();
        let list = vms(1_001);
        let send = send_list(tx, &list);
        let read = async {
            let mut sizes = Vec::new();
            while let Some(page) = inventory.next().await.unwrap() {
                sizes.push(page.len());
            }
            sizes
        };
        let ((), sizes) = tokio::join!(send, read);
        assert_eq!(sizes, [500, 500, 1]);
        assert!(inventory.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_fed_inventory_ends_only_when_its_listing_says_so() {
        let (tx, mut inventory) = Inventory::fed();
        tokio::spawn(async move {
            for page in [vms(3), vms(0), vms(2)] {
                tx.send(Feed::Page(page)).await.unwrap();
            }
            tx.send(Feed::End).await.unwrap();
        });
        let mut sizes = Vec::new();
        while let Some(page) = inventory.next().await.unwrap() {
            sizes.push(page.len());
        }
        assert_eq!(sizes, [3, 2]);
        assert!(inventory.next().await.unwrap().is_none());

        let (tx, mut inventory) = Inventory::fed();
        tx.send(Feed::Page(vms(1))).await.unwrap();
        tx.send(Feed::Failed("Prism answered 500".into()))
            .await
            .unwrap();
        assert!(inventory.next().await.unwrap().is_some());
        let failed = inventory.next().await.err().unwrap();
        assert_eq!(
            failed.to_string(),
            "the inventory could not be read to its end: Prism answered 500"
        );

        // A listing that goes away without saying it is done is not an end.
        let (tx, mut inventory) = Inventory::fed();
        drop(tx);
        assert!(matches!(inventory.next().await, Err(FeedError::Abandoned)));
    }
}
