//! A list that only grows and never moves its items: the keys an upstream starts with, then
//! those added at run time. Readers index it without a lock while a writer appends, and a
//! reference to an item stays valid for as long as the list lives, so a key's name and secret
//! can be lent to a request without copying.
//!
//! The items known at start sit in one slice, so that a list that never grows costs what a
//! slice costs; appended items go to a `boxcar` vector (buckets of doubling size that are
//! never reallocated).

use std::ops::Index;

/// An append-only list with stable item addresses.
pub struct AppendOnly<T> {
    first: Box<[T]>,
    added: boxcar::Vec<T>,
}

impl<T> AppendOnly<T> {
    /// A list holding `first`.
    pub fn new(first: Vec<T>) -> Self {
        Self {
            first: first.into_boxed_slice(),
            added: boxcar::Vec::new(),
        }
    }

    /// How many items the list was made with.
    pub fn initial_len(&self) -> usize {
        self.first.len()
    }

    /// How many items it holds now.
    #[inline]
    pub fn len(&self) -> usize {
        self.first.len() + self.added.count()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item at `idx`, if there is one.
    #[inline]
    pub fn get(&self, idx: usize) -> Option<&T> {
        match self.first.get(idx) {
            Some(item) => Some(item),
            None => self.added.get(idx - self.first.len()),
        }
    }

    /// Appends `item`; its index. Callers that keep several lists index-aligned must append to
    /// them under one lock of their own.
    pub fn push(&self, item: T) -> usize {
        self.first.len() + self.added.push(item)
    }

    /// The items in index order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.first
            .iter()
            .chain(self.added.iter().map(|(_, item)| item))
    }
}

impl<T> Index<usize> for AppendOnly<T> {
    type Output = T;

    /// # Panics
    /// If `idx` is not below [`AppendOnly::len`], like slice indexing.
    #[inline]
    fn index(&self, idx: usize) -> &T {
        match self.get(idx) {
            Some(item) => item,
            None => panic!("index {idx} out of range for a list of {}", self.len()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn appended_items_follow_the_initial_ones_in_index_order() {
        let list = AppendOnly::new(vec!["a", "b"]);
        assert_eq!((list.initial_len(), list.len()), (2, 2));
        assert_eq!(list.push("c"), 2);
        assert_eq!(list.push("d"), 3);
        assert_eq!(list.len(), 4);
        assert_eq!(
            list.iter().copied().collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!((list[0], list[3]), ("a", "d"));
        assert_eq!(list.get(4), None);
    }

    #[test]
    fn a_reference_stays_valid_while_the_list_grows() {
        let list = AppendOnly::new(Vec::<String>::new());
        assert!(list.is_empty());
        list.push("first".to_string());
        let first: &str = &list[0];
        for i in 0..1000 {
            list.push(i.to_string());
        }
        assert_eq!(first, "first");
        assert_eq!(list[1000], "999");
    }

    #[test]
    fn readers_on_other_threads_see_every_item_below_len() {
        let list = Arc::new(AppendOnly::new(vec![0usize]));
        let reader = {
            let list = Arc::clone(&list);
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < 500 {
                    let n = list.len();
                    for i in 0..n {
                        assert_eq!(list.get(i), Some(&i));
                    }
                    seen = n;
                }
            })
        };
        for i in 1..500 {
            assert_eq!(list.push(i), i);
        }
        reader.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn indexing_past_the_end_panics_like_a_slice() {
        let list = AppendOnly::new(vec![1]);
        let _ = list[1];
    }
}
