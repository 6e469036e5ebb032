//! Stop sequences over streamed text: pieces pass through as soon as no stop sequence can begin
//! in them; text that might be the start of one is held back until the next piece decides.

/// Filters generated text for the first occurrence of any stop sequence.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    hit: bool,
}

impl StopFilter {
    /// `stops` must not contain the empty string (the request check rejects it).
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops,
            pending: String::new(),
            hit: false,
        }
    }

    /// Whether a stop sequence was found: nothing more is emitted.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// Takes the next piece of text and returns what can be emitted now: everything before a
    /// stop sequence, except a tail that might still become one.
    pub fn push(&mut self, piece: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.hit = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_match(&self.pending, s))
            .max()
            .unwrap_or(0);
        let rest = self.pending.split_off(self.pending.len() - held);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The text still held back, once generation has ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Bytes of the longest tail of `text` that is a proper prefix of `stop` (both on character
/// boundaries).
fn partial_match(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .filter(|&k| k > 0 && text.ends_with(&stop[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out += &f.push(p);
        }
        let hit = f.hit();
        if !hit {
            out += &f.finish();
        }
        (out, hit)
    }

    #[test]
    fn passes_text_without_stops() {
        assert_eq!(run(&[], &["a", "bc", ""]), ("abc".into(), false));
        assert_eq!(run(&["xyz"], &["ab", "xy", "z!"]), ("ab".into(), true));
    }

    #[test]
    fn stop_split_over_pieces_is_found_and_cut() {
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["END"], &["x E", "N", "D y"]), ("x ".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let mut f = StopFilter::new(vec!["END".into()]);
        assert_eq!(f.push("a E"), "a ");
        assert_eq!(f.push("N"), "");
        assert_eq!(f.push("x"), "ENx");
        assert!(!f.hit());
        assert_eq!(f.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&["bc", "c"], &["ab", "cd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_held_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éa"], &["café", "b"]), ("caféb".into(), false));
        assert_eq!(run(&["日本"], &["今日", "は"]), ("今日は".into(), false));
    }

    #[test]
    fn nothing_after_the_stop() {
        let mut f = StopFilter::new(vec!["x".into()]);
        assert_eq!(f.push("axb"), "a");
        assert_eq!(f.push("more"), "");
        assert!(f.hit());
    }
}
