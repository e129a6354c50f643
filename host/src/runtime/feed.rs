//! Where a paged reconcile's pages come from: a list the host already
//! holds, or a source's listing that sends each page as it reads it, so that
//! the host holds a few pages rather than the inventory.

use std::ops::Range;
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

/// The inventory of one paged reconcile call.
pub enum Inventory {
    /// Listed before the call, handed out [`INVENTORY_PAGE`] VMs at a time.
    Listed { vms: Arc<Vec<Vm>>, next: usize },
    /// Sent while the call runs.
    Fed {
        pages: mpsc::Receiver<Feed>,
        ended: bool,
    },
}

/// A page to hand out: which VMs of which list.
pub struct Page {
    pub vms: Arc<Vec<Vm>>,
    pub range: Range<usize>,
}

impl Page {
    pub fn vms(&self) -> &[Vm] {
        &self.vms[self.range.clone()]
    }
}

impl Inventory {
    pub fn listed(vms: Arc<Vec<Vm>>) -> Inventory {
        Inventory::Listed { vms, next: 0 }
    }

    /// A feed and the inventory that reads it.
    pub fn fed() -> (FeedSender, Inventory) {
        let (tx, pages) = mpsc::channel(AHEAD);
        (
            tx,
            Inventory::Fed {
                pages,
                ended: false,
            },
        )
    }

    pub fn is_fed(&self) -> bool {
        matches!(self, Inventory::Fed { .. })
    }

    /// The next page, `None` once every VM was handed out (and after that).
    pub async fn next(&mut self) -> Result<Option<Page>, FeedError> {
        match self {
            Inventory::Listed { vms, next } => {
                let start = *next;
                let end = vms.len().min(start + INVENTORY_PAGE);
                if start >= end {
                    return Ok(None);
                }
                *next = end;
                Ok(Some(Page {
                    vms: vms.clone(),
                    range: start..end,
                }))
            }
            Inventory::Fed { ended: true, .. } => Ok(None),
            Inventory::Fed { pages, ended } => loop {
                match pages.recv().await {
                    // An empty page says nothing; the plugin is told `none`
                    // only at the end.
                    Some(Feed::Page(vms)) if vms.is_empty() => continue,
                    Some(Feed::Page(vms)) => {
                        let range = 0..vms.len();
                        return Ok(Some(Page { vms, range }));
                    }
                    Some(Feed::End) => {
                        *ended = true;
                        return Ok(None);
                    }
                    Some(Feed::Failed(reason)) => return Err(FeedError::Failed(reason)),
                    None => return Err(FeedError::Abandoned),
                }
            },
        }
    }
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
    async fn a_listed_inventory_is_handed_out_in_pages_of_five_hundred() {
        let mut inventory = Inventory::listed(vms(1_001));
        let mut sizes = Vec::new();
        while let Some(page) = inventory.next().await.unwrap() {
            sizes.push(page.vms().len());
        }
        assert_eq!(sizes, [500, 500, 1]);
        assert!(inventory.next().await.unwrap().is_none());
        assert!(Inventory::listed(vms(0)).next().await.unwrap().is_none());
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
            sizes.push(page.vms().len());
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
