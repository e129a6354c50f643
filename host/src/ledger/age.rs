//! Which stored rows a prune may delete, read in arrival order by the time each was received.
//!
//! Ids follow arrival, so the first row young enough to keep ends a prune's scan. A row stamped
//! ahead of the clock (received while the clock ran fast, which has stepped back since) would
//! end it too, and keep every later row however old, until the clock caught up with its stamp.
//! Its age is unknown instead: it goes with the first later row old enough to go, since it
//! arrived before that one, and the scan goes on past it.

pub(crate) struct ByAge {
    now_ms: u64,
    cutoff_ms: u64,
    /// Rows stamped ahead of the clock since the last old row.
    ahead: Vec<u64>,
    first_young: Option<u64>,
}

impl ByAge {
    /// Rows received before `cutoff_ms` go; `now_ms` tells stamps ahead of the clock.
    pub fn new(now_ms: u64, cutoff_ms: u64) -> ByAge {
        ByAge {
            now_ms,
            cutoff_ms,
            ahead: Vec::new(),
            first_young: None,
        }
    }

    /// Sorts row `id`, received at `received_ms`, adding to `old` what is known to be old (it,
    /// and the rows stamped ahead before it). Whether to read on.
    pub fn read_on(&mut self, id: u64, received_ms: u64, old: &mut Vec<u64>) -> bool {
        if received_ms > self.now_ms {
            self.ahead.push(id);
            true
        } else if received_ms >= self.cutoff_ms {
            self.first_young = Some(id);
            false
        } else {
            old.append(&mut self.ahead);
            old.push(id);
            true
        }
    }

    /// The first row read that is kept, if one was.
    pub fn first_kept(&self) -> Option<u64> {
        self.ahead.first().copied().or(self.first_young)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sort(rows: &[(u64, u64)]) -> (Vec<u64>, Option<u64>) {
        let mut by_age = ByAge::new(1_000, 500);
        let mut old = Vec::new();
        for &(id, at) in rows {
            if !by_age.read_on(id, at, &mut old) {
                break;
            }
        }
        (old, by_age.first_kept())
    }

    #[test]
    fn a_row_stamped_ahead_of_the_clock_goes_with_the_first_old_row_after_it() {
        assert_eq!(
            sort(&[(1, 100), (2, 400), (3, 600), (4, 200)]),
            (vec![1, 2], Some(3))
        );
        assert_eq!(
            sort(&[(1, 9_000), (2, 100), (3, 700)]),
            (vec![1, 2], Some(3))
        );
        assert_eq!(
            sort(&[(1, 100), (2, 9_000), (3, 900), (4, 100)]),
            (vec![1], Some(2)),
            "ahead, then young: both kept"
        );
        assert_eq!(sort(&[(1, 9_000), (2, 9_500)]), (vec![], Some(1)));
        assert_eq!(sort(&[(1, 100)]), (vec![1], None));
    }
}
