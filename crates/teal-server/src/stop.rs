//! Stop sequences over streamed text: pieces pass through as soon as no stop sequence can begin
//! in them; text that might be the start of one is held back until the next piece decides.

/// Filters generated text for the first occurrence of any stop sequence.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    /// The stop sequence found (its index in `stops`).
    hit: Option<usize>,
}

impl StopFilter {
    /// `stops` must not contain the empty string (the request check rejects it).
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops,
            pending: String::new(),
            hit: None,
        }
    }

    /// Whether a stop sequence was found: nothing more is emitted.
    pub fn hit(&self) -> bool {
        self.hit.is_some()
    }

    /// The stop sequence found, if any (the earliest in the text; of two starting at the same
    /// place, the first listed).
    pub fn stopping_word(&self) -> Option<&str> {
        self.hit.map(|i| self.stops[i].as_str())
    }

    /// Takes the next piece of text and returns what can be emitted now: everything before a
    /// stop sequence, except a tail that might still become one.
    pub fn push(&mut self, piece: &str) -> String {
        if self.hit.is_some() {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some((at, i)) = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i)))
            .min()
        {
            self.hit = Some(i);
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

/// llama.cpp's `n_indent` for code completion: generation ends at the first character of a
/// line after the first that is indented less than `min` spaces or tabs, and the text is cut
/// before that character (its indentation stays).
#[derive(Debug)]
pub struct IndentLimit {
    min: usize,
    /// The indentation of the current line while it has only spaces and tabs; `None` on the
    /// first line and once a line has other text.
    indent: Option<usize>,
}

impl IndentLimit {
    /// `min` = 0: no limit.
    pub fn new(min: usize) -> IndentLimit {
        IndentLimit { min, indent: None }
    }

    /// The bytes of `piece` to keep: all of it, or those before the character that ends
    /// generation (`Err`).
    pub fn push(&mut self, piece: &str) -> Result<usize, usize> {
        if self.min == 0 {
            return Ok(piece.len());
        }
        for (at, c) in piece.char_indices() {
            self.indent = match (c, self.indent) {
                ('\n', _) => Some(0),
                ('\r', n) => n,
                (' ' | '\t', Some(n)) => Some(n + 1),
                (_, Some(n)) if n < self.min => return Err(at),
                _ => None,
            };
        }
        Ok(piece.len())
    }
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
        let word = |stops: &[&str], text: &str| {
            let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
            f.push(text);
            f.stopping_word().map(str::to_string)
        };
        assert_eq!(word(&["cd", "b"], "abcd").as_deref(), Some("b"));
        // Two starting at the same place: the first listed.
        assert_eq!(word(&["bcd", "bc"], "abcd").as_deref(), Some("bcd"));
        assert_eq!(word(&["bc", "bcd"], "abcd").as_deref(), Some("bc"));
        assert_eq!(word(&["x"], "abcd"), None);
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

    #[test]
    fn indent_limit_cuts_the_first_line_indented_less() {
        let run = |min: usize, pieces: &[&str]| {
            let mut f = IndentLimit::new(min);
            let mut out = String::new();
            for p in pieces {
                match f.push(p) {
                    Ok(n) => out += &p[..n],
                    Err(n) => return (out + &p[..n], true),
                }
            }
            (out, false)
        };
        // The first line is never cut; a later line with less indentation is, before its text.
        assert_eq!(
            run(4, &["x = 1", "\n    y", " = 2\n", "  z"]),
            ("x = 1\n    y = 2\n  ".into(), true)
        );
        // Blank lines and lines indented enough pass; tabs count as one each.
        assert_eq!(
            run(2, &["a\n\n", "\t\tb\n  c"]),
            ("a\n\n\t\tb\n  c".into(), false)
        );
        assert_eq!(run(2, &["a\n", "\tb"]), ("a\n\t".into(), true));
        // 0: no limit.
        assert_eq!(run(0, &["a\nb"]), ("a\nb".into(), false));
    }
}
