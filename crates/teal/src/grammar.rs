//! GBNF grammars, llama.cpp's format for constrained sampling (its `grammars/README.md`):
//!
//! ```text
//! root   ::= answer ("," ws answer)*      # rules: name ::= alternatives
//! answer ::= "yes" | "no" | [0-9]+ | item?
//! item   ::= [^\n,]{1,8}                   # classes, negated, repetitions {m}, {m,}, {m,n}
//! ws     ::= [ \t]*
//! ```
//!
//! Literals `"..."` and classes `[...]` take the escapes `\n \r \t \\ \" \] \[ \- \xHH \uHHHH
//! \UHHHHHHHH`; `.` is any character; `( )` groups; `*`, `+`, `?` and `{m,n}` repeat the item
//! before them; `#` starts a comment; a rule ends at the end of its line, except inside
//! parentheses, after `::=` or `|`, and before a line that starts with `|`. The rule `root` is the whole text. Left-recursive rules
//! that leave something to match after the return (`a ::= a "x"`) are refused (as llama.cpp
//! does); a loop that matches empty (`("a"?)*`) is followed once per stack, so matching always
//! ends.
//!
//! [`GrammarState`] recognizes prefixes the way llama.cpp's sampler does: a set of stacks of
//! positions in the rules, each with a character class on top, advanced one code point at a
//! time (a token's bytes may end inside a UTF-8 character). [`GrammarMode`] is the sampler's
//! view: which tokens may come next. A lazy grammar ([`Grammar::lazy`]) applies only once one
//! of its [`Trigger`]s matches, from the start of that match on (llama.cpp's lazy grammars,
//! used for tool calls).

use crate::tokenizer::{TokenBytes, Tokenizer};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// The most repetitions `{m,n}` may ask for (each is a copy of the item in the rules).
pub const MAX_REPEAT: u32 = 1000;

/// The most stacks a state keeps; an ambiguous grammar that needs more stops with an error
/// ([`GrammarState::error`]) rather than drop ways the text may still match. In sampling, a
/// token whose text would pass the limit is not allowed (the answer stays one the grammar
/// accepts, though it cannot take that way).
pub const MAX_STACKS: usize = 4096;

/// The most distinct stacks one character may visit while rule references are followed; a
/// grammar that needs more stops with an error ([`GrammarState::error`]).
pub const MAX_STEP_STACKS: usize = 1 << 16;

/// The most rules a grammar may have, those made for groups and repetitions included.
pub const MAX_RULES: usize = 65536;

/// The deepest nesting of parentheses.
pub const MAX_NESTING: usize = 128;

/// A grammar that could not be read: where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrammarError {
    /// 1-based line and column of the problem in the grammar's text (0: the whole grammar).
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

impl fmt::Display for GrammarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "line {} column {}: {}", self.line, self.col, self.msg)
        }
    }
}

impl std::error::Error for GrammarError {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Elem {
    /// A code point inside one of the inclusive ranges (sorted, no two that overlap or touch:
    /// see `merge`), or with `negated` outside all of them.
    Char {
        ranges: Vec<(u32, u32)>,
        negated: bool,
    },
    Rule(u32),
}

impl Elem {
    fn matches(&self, cp: u32) -> bool {
        match self {
            Elem::Char { ranges, negated } => {
                ranges.iter().any(|&(a, b)| a <= cp && cp <= b) != *negated
            }
            Elem::Rule(_) => false,
        }
    }

    /// Whether some code point in `lo..=hi` may match (for a character cut by a token's end).
    fn may_match(&self, lo: u32, hi: u32) -> bool {
        match self {
            Elem::Char {
                ranges,
                negated: false,
            } => ranges.iter().any(|&(a, b)| a <= hi && lo <= b),
            Elem::Char {
                ranges,
                negated: true,
            } => !ranges.iter().any(|&(a, b)| a <= lo && hi <= b),
            Elem::Rule(_) => false,
        }
    }
}

/// A parsed grammar: each rule's alternatives, each a sequence of elements (repetitions and
/// groups become rules of their own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grammar {
    rules: Vec<Vec<Vec<Elem>>>,
    names: Vec<String>,
    /// The line and column where each rule is first named (or, made for a group or a
    /// repetition, ends).
    at: Vec<(usize, usize)>,
    root: u32,
    /// See [`Grammar::lazy`]; empty: the grammar applies from the start.
    triggers: Vec<Trigger>,
}

/// What makes a lazy grammar apply ([`Grammar::lazy`]), as llama.cpp's grammar triggers: the
/// grammar then reads the output from the start of the trigger's match, the match included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// This text anywhere in the output (llama.cpp's trigger words).
    Word(String),
    /// A whole match of this grammar at the start of the output, as soon as the output so far
    /// is one (llama.cpp's full patterns, anchored at the start); its own triggers are
    /// ignored.
    Start(Arc<Grammar>),
}

impl Grammar {
    /// Parses GBNF text; the rule `root` is the start.
    pub fn parse(text: &str) -> Result<Grammar, GrammarError> {
        let mut p = Parser {
            src: text.chars().collect(),
            pos: 0,
            depth: 0,
            ids: HashMap::new(),
            rules: Vec::new(),
            names: Vec::new(),
            first_use: Vec::new(),
        };
        p.grammar()?;
        let g = p.finish()?;
        g.check_left_recursion()?;
        Ok(g)
    }

    /// The same grammar made lazy (llama.cpp's lazy grammars): the output is free until one of
    /// `triggers` matches, and from the start of that match on (the trigger's text included)
    /// it must match the grammar. Where several could match, the first to be whole wins (a
    /// start trigger where both are whole at the same byte). Without triggers, the grammar
    /// applies from the start.
    pub fn lazy(mut self, triggers: Vec<Trigger>) -> Grammar {
        self.triggers = triggers;
        self
    }

    /// The number of rules, those made for groups and repetitions included.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The rules that match the empty text.
    fn nullable(&self) -> Vec<bool> {
        self.least_fixed_point(false)
    }

    /// Whether each rule matches some text.
    fn productive(&self) -> Vec<bool> {
        self.least_fixed_point(true)
    }

    /// The least marking in which a rule is marked once one of its alternatives has every
    /// element hold: a rule reference holds when its rule is marked, a character class when
    /// `chars_hold`. A work list (each alternative counts its references not yet marked), so
    /// linear in the grammar's size, also along a long chain of rules.
    fn least_fixed_point(&self, chars_hold: bool) -> Vec<bool> {
        let n = self.rules.len();
        let mut marked = vec![false; n];
        let (mut owner, mut waiting) = (Vec::new(), Vec::new());
        // For each rule, the alternatives that reference it (once per reference).
        let mut users = vec![Vec::new(); n];
        let mut ready = Vec::new();
        for (r, alts) in self.rules.iter().enumerate() {
            for seq in alts {
                let refs = seq.iter().filter_map(|e| match e {
                    Elem::Rule(x) => Some(*x as usize),
                    Elem::Char { .. } => None,
                });
                if !chars_hold && refs.clone().count() < seq.len() {
                    continue;
                }
                let alt = owner.len();
                owner.push(r);
                waiting.push(refs.clone().count());
                refs.for_each(|x| users[x].push(alt));
                if waiting[alt] == 0 {
                    ready.push(r);
                }
            }
        }
        while let Some(r) = ready.pop() {
            if std::mem::replace(&mut marked[r], true) {
                continue;
            }
            for &alt in &users[r] {
                waiting[alt] -= 1;
                if waiting[alt] == 0 {
                    ready.push(owner[alt]);
                }
            }
        }
        marked
    }

    /// Refuses a rule that can reach itself before consuming a character with something left
    /// to match after the return (`a ::= a "x"`): following it would grow the stacks without
    /// end; or that can reach itself so and matches no text at all (`a ::= a`). A loop in which
    /// each rule is the last thing left (`("a"?)*`, a repetition of an item that may match
    /// empty) comes back to a stack already met, and [`Step`] follows each once.
    fn check_left_recursion(&self) -> Result<(), GrammarError> {
        let null = self.nullable();
        // The rules each rule may start with, and whether something follows them there.
        let starts: Vec<Vec<(usize, bool)>> = self
            .rules
            .iter()
            .map(|alts| {
                let mut s = Vec::new();
                for seq in alts {
                    for (i, e) in seq.iter().enumerate() {
                        match e {
                            Elem::Rule(x) => {
                                s.push((*x as usize, i + 1 < seq.len()));
                                if !null[*x as usize] {
                                    break;
                                }
                            }
                            Elem::Char { .. } => break,
                        }
                    }
                }
                s
            })
            .collect();
        let comp = components(&starts);
        let some = self.productive();
        for (r, edges) in starts.iter().enumerate() {
            if edges
                .iter()
                .any(|&(x, more)| (more || !some[r]) && comp[x] == comp[r])
            {
                let (line, col) = self.at[r];
                return Err(GrammarError {
                    line,
                    col,
                    msg: format!(
                        "rule '{}' is left-recursive (it can reach itself before any \
                         character)",
                        self.names[r]
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The strongly connected components of the graph `edges` (Kosaraju's, without recursion):
/// each node's component number.
fn components(edges: &[Vec<(usize, bool)>]) -> Vec<usize> {
    let n = edges.len();
    // The nodes in the order their depth-first visits finish.
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    for r in 0..n {
        if seen[r] {
            continue;
        }
        seen[r] = true;
        let mut path = vec![(r, 0usize)];
        while let Some((at, next)) = path.last_mut() {
            match edges[*at].get(*next) {
                Some(&(x, _)) => {
                    *next += 1;
                    if !seen[x] {
                        seen[x] = true;
                        path.push((x, 0));
                    }
                }
                None => {
                    order.push(*at);
                    path.pop();
                }
            }
        }
    }
    let mut back = vec![Vec::new(); n];
    for (r, es) in edges.iter().enumerate() {
        for &(x, _) in es {
            back[x].push(r);
        }
    }
    let mut comp = vec![usize::MAX; n];
    for (c, &r) in order.iter().rev().enumerate() {
        if comp[r] != usize::MAX {
            continue;
        }
        comp[r] = c;
        let mut todo = vec![r];
        while let Some(at) = todo.pop() {
            for &x in &back[at] {
                if comp[x] == usize::MAX {
                    comp[x] = c;
                    todo.push(x);
                }
            }
        }
    }
    comp
}

struct Parser {
    src: Vec<char>,
    pos: usize,
    /// Parentheses open at `pos`.
    depth: usize,
    ids: HashMap<String, u32>,
    /// `None`: referred to, not (yet) defined.
    rules: Vec<Option<Vec<Vec<Elem>>>>,
    names: Vec<String>,
    /// Where each rule was first named, for the error of an undefined one.
    first_use: Vec<usize>,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Parser {
    fn err<T>(&self, at: usize, msg: impl Into<String>) -> Result<T, GrammarError> {
        let (mut line, mut col) = (1, 1);
        for &c in &self.src[..at.min(self.src.len())] {
            if c == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
        }
        Err(GrammarError {
            line,
            col,
            msg: msg.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.pos).copied()
    }

    /// Skips spaces, tabs and comments, and line breaks too where `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn id(&mut self, name: &str, at: usize) -> Result<u32, GrammarError> {
        if let Some(&i) = self.ids.get(name) {
            return Ok(i);
        }
        let i = self.new_rule(at)?;
        self.ids.insert(name.to_string(), i);
        self.rules.push(None);
        self.names.push(name.to_string());
        self.first_use.push(at);
        Ok(i)
    }

    /// The number of the next rule, or the error of one rule too many (counted as rules are
    /// made, so that a grammar over the limit is refused before it grows any further).
    fn new_rule(&self, at: usize) -> Result<u32, GrammarError> {
        if self.rules.len() == MAX_RULES {
            return self.err(
                at,
                format!(
                    "{} rules (with those made for groups and repetitions): at most {MAX_RULES}",
                    MAX_RULES + 1
                ),
            );
        }
        Ok(self.rules.len() as u32)
    }

    /// A rule made for a group or a repetition.
    fn synthetic(&mut self, base: &str, alts: Vec<Vec<Elem>>) -> Result<u32, GrammarError> {
        // Not in `ids`: the grammar's own names cannot refer to it (or clash with it).
        let i = self.new_rule(self.pos)?;
        let name = format!("{base}-{i}");
        self.rules.push(Some(alts));
        self.names.push(name);
        self.first_use.push(self.pos);
        Ok(i)
    }

    fn name(&mut self) -> Result<String, GrammarError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.err(start, "expected a rule name");
        }
        Ok(self.src[start..self.pos].iter().collect())
    }

    fn grammar(&mut self) -> Result<(), GrammarError> {
        loop {
            self.space(true);
            if self.peek().is_none() {
                return Ok(());
            }
            let at = self.pos;
            let name = self.name()?;
            self.space(false);
            if !self.src[self.pos..].starts_with(&[':', ':', '=']) {
                return self.err(self.pos, format!("expected '::=' after rule name '{name}'"));
            }
            self.pos += 3;
            self.space(true);
            let alts = self.alternates(&name, false)?;
            let id = self.id(&name, at)?;
            if self.rules[id as usize].is_some() {
                return self.err(at, format!("rule '{name}' is defined twice"));
            }
            self.rules[id as usize] = Some(alts);
            match self.peek() {
                None | Some('\n') | Some('\r') => {}
                Some(c) => return self.err(self.pos, format!("unexpected '{c}'")),
            }
        }
    }

    fn alternates(&mut self, name: &str, nested: bool) -> Result<Vec<Vec<Elem>>, GrammarError> {
        let mut alts = vec![self.sequence(name, nested)?];
        loop {
            // A line that starts with `|` goes on with the rule.
            let here = self.pos;
            self.space(true);
            if self.peek() != Some('|') {
                self.pos = here;
                break;
            }
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(name, nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, name: &str, nested: bool) -> Result<Vec<Elem>, GrammarError> {
        let mut seq: Vec<Elem> = Vec::new();
        loop {
            let start = seq.len();
            let at = self.pos;
            match self.peek() {
                Some('"') => {
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None => return self.err(at, "unterminated literal"),
                            Some('"') => {
                                self.pos += 1;
                                break;
                            }
                            _ => {
                                let c = self.char_in(at)?;
                                seq.push(Elem::Char {
                                    ranges: vec![(c, c)],
                                    negated: false,
                                });
                            }
                        }
                    }
                }
                Some('[') => {
                    self.pos += 1;
                    let negated = self.peek() == Some('^');
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None => return self.err(at, "unterminated character class"),
                            Some(']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => {
                                let a = self.char_in(at)?;
                                let b = if self.peek() == Some('-')
                                    && self.src.get(self.pos + 1).is_some_and(|&c| c != ']')
                                {
                                    self.pos += 1;
                                    self.char_in(at)?
                                } else {
                                    a
                                };
                                if b < a {
                                    return self.err(at, "character range out of order");
                                }
                                ranges.push((a, b));
                            }
                        }
                    }
                    seq.push(Elem::Char {
                        ranges: merge(ranges),
                        negated,
                    });
                }
                Some('.') => {
                    self.pos += 1;
                    seq.push(Elem::Char {
                        ranges: Vec::new(),
                        negated: true,
                    });
                }
                Some('(') => {
                    if self.depth == MAX_NESTING {
                        return self.err(at, format!("parentheses nested over {MAX_NESTING} deep"));
                    }
                    self.pos += 1;
                    self.depth += 1;
                    self.space(true);
                    let alts = self.alternates(name, true)?;
                    self.depth -= 1;
                    self.space(true);
                    if self.peek() != Some(')') {
                        return self.err(at, "expected ')' to close this group");
                    }
                    self.pos += 1;
                    let r = self.synthetic(name, alts)?;
                    seq.push(Elem::Rule(r));
                }
                Some(c) if is_word(c) => {
                    let n = self.name()?;
                    let r = self.id(&n, at)?;
                    seq.push(Elem::Rule(r));
                }
                _ => return Ok(seq),
            }
            self.space(nested);
            self.repetition(name, &mut seq, start)?;
            self.space(nested);
        }
    }

    /// Applies a `*`, `+`, `?` or `{m,n}` after the item that starts at `seq[start]`.
    fn repetition(
        &mut self,
        name: &str,
        seq: &mut Vec<Elem>,
        start: usize,
    ) -> Result<(), GrammarError> {
        let at = self.pos;
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.pos += 1;
                self.space(false);
                let m = self.number(at)?;
                self.space(false);
                let n = if self.peek() == Some(',') {
                    self.pos += 1;
                    self.space(false);
                    if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        Some(self.number(at)?)
                    } else {
                        None
                    }
                } else {
                    Some(m)
                };
                self.space(false);
                if self.peek() != Some('}') {
                    return self.err(at, "expected '}' to close the repetition");
                }
                if n.is_some_and(|n| n < m) {
                    return self.err(at, "repetition {m,n} with n < m");
                }
                if m.max(n.unwrap_or(0)) > MAX_REPEAT {
                    return self.err(at, format!("repetition over {MAX_REPEAT}"));
                }
                (m, n)
            }
            _ => return Ok(()),
        };
        self.pos += 1;
        let item: Vec<Elem> = seq.drain(start..).collect();
        if item.is_empty() {
            return self.err(at, "repetition without an item before it");
        }
        // One element for the item, so it can be copied and referred to.
        let one = if item.len() == 1 {
            item[0].clone()
        } else {
            Elem::Rule(self.synthetic(name, vec![item])?)
        };
        for _ in 0..min {
            seq.push(one.clone());
        }
        match max {
            None => {
                // r ::= item r | (empty)
                let r = self.synthetic(name, Vec::new())?;
                self.rules[r as usize] = Some(vec![vec![one, Elem::Rule(r)], Vec::new()]);
                seq.push(Elem::Rule(r));
            }
            Some(max) if max > min => {
                // Nested optionals: o_1 ::= item | (empty), o_k ::= item o_(k-1) | (empty).
                let mut inner: Option<u32> = None;
                for _ in min..max {
                    let mut body = vec![one.clone()];
                    if let Some(i) = inner {
                        body.push(Elem::Rule(i));
                    }
                    inner = Some(self.synthetic(name, vec![body, Vec::new()])?);
                }
                if let Some(i) = inner {
                    seq.push(Elem::Rule(i));
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn number(&mut self, at: usize) -> Result<u32, GrammarError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let s: String = self.src[start..self.pos].iter().collect();
        match s.parse() {
            Ok(n) => Ok(n),
            Err(_) => self.err(at, "expected a number in the repetition"),
        }
    }

    /// One character of a literal or class, escapes decoded.
    fn char_in(&mut self, at: usize) -> Result<u32, GrammarError> {
        let Some(c) = self.peek() else {
            return self.err(at, "unexpected end of the grammar");
        };
        self.pos += 1;
        if c != '\\' {
            return Ok(c as u32);
        }
        let Some(e) = self.peek() else {
            return self.err(at, "unexpected end after '\\'");
        };
        self.pos += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<u32, GrammarError> {
            let s: String = p.src.iter().skip(p.pos).take(n).collect();
            let digits = s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
            match digits.then(|| u32::from_str_radix(&s, 16)) {
                Some(Ok(v)) if char::from_u32(v).is_some() => {
                    p.pos += n;
                    Ok(v)
                }
                _ => p.err(
                    p.pos,
                    format!("expected {n} hexadecimal digits of a character"),
                ),
            }
        };
        Ok(match e {
            'n' => '\n' as u32,
            'r' => '\r' as u32,
            't' => '\t' as u32,
            '0' => 0,
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' | '.' | '\'' | '|' | '(' | ')' | '*' | '+'
            | '?' | '{' | '}' | '#' => e as u32,
            other => return self.err(self.pos - 2, format!("unknown escape '\\{other}'")),
        })
    }

    fn finish(self) -> Result<Grammar, GrammarError> {
        let Some(&root) = self.ids.get("root") else {
            return Err(GrammarError {
                line: 0,
                col: 0,
                msg: "no rule named 'root' (the whole text)".into(),
            });
        };
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            match r {
                Some(alts) => rules.push(alts.clone()),
                None => {
                    return self.err(
                        self.first_use[i],
                        format!("rule '{}' is used but not defined", self.names[i]),
                    )
                }
            }
        }
        if rules[root as usize].is_empty() {
            return Err(GrammarError {
                line: 0,
                col: 0,
                msg: "the rule 'root' is empty".into(),
            });
        }
        let mut at = Vec::with_capacity(self.first_use.len());
        let (mut line, mut col, mut i) = (1, 1, 0);
        let mut order: Vec<(usize, usize)> = self.first_use.iter().copied().zip(0..).collect();
        order.sort_unstable();
        at.resize(order.len(), (0, 0));
        for (pos, r) in order {
            while i < pos.min(self.src.len()) {
                if self.src[i] == '\n' {
                    line += 1;
                    col = 1;
                } else {
                    col += 1;
                }
                i += 1;
            }
            at[r] = (line, col);
        }
        Ok(Grammar {
            rules,
            names: self.names,
            at,
            root,
            triggers: Vec::new(),
        })
    }
}

/// `ranges` sorted and merged where they overlap or touch, so that a range of code points is
/// inside the class's ranges only if it is inside one of them.
fn merge(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// A position in a rule: the element `idx` of alternative `alt` of rule `rule` comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Pos {
    rule: u32,
    alt: u32,
    idx: u32,
}

/// Where a recognizer is: the stacks of positions still alive (an empty stack: the text so far
/// is a whole match of `root`), and the bytes of a UTF-8 character begun by the last token.
#[derive(Clone, Debug)]
pub struct GrammarState {
    g: Arc<Grammar>,
    stacks: Vec<Vec<Pos>>,
    /// The code point's bits so far, the continuation bytes still due and the character's
    /// length in bytes.
    partial: (u32, u8, u8),
    /// The bytes the next continuation byte may be (narrower after some lead bytes, so that
    /// no overlong form, surrogate or code point over U+10FFFF gets through).
    next: (u8, u8),
    /// Why the state stopped though the text may still match: a limit on the stacks passed.
    error: Option<String>,
}

impl GrammarState {
    pub fn new(g: Arc<Grammar>) -> GrammarState {
        let mut step = Step::default();
        for alt in 0..g.rules[g.root as usize].len() {
            let start = vec![Pos {
                rule: g.root,
                alt: alt as u32,
                idx: 0,
            }];
            step.expand(&g, start);
        }
        let mut s = GrammarState {
            g,
            stacks: Vec::new(),
            partial: (0, 0, 0),
            next: (0x80, 0xbf),
            error: None,
        };
        s.finish(step);
        s
    }

    /// Takes the stacks of a step, or stops with an error where it passed a limit.
    fn finish(&mut self, step: Step) {
        let error = if step.over {
            format!("the grammar needs over {MAX_STEP_STACKS} stacks to follow one character")
        } else if step.out.len() > MAX_STACKS {
            format!(
                "the grammar is ambiguous beyond {MAX_STACKS} stacks (ways to match the text so \
                 far)"
            )
        } else {
            self.stacks = step.out;
            return;
        };
        self.stacks.clear();
        self.error = Some(error);
    }

    /// Why the state stopped though the text may still match (a limit passed: [`MAX_STACKS`]
    /// or [`MAX_STEP_STACKS`]); `None` while it runs or when the text does not match.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether the text so far is a whole match of `root` (nothing more needs to come).
    pub fn accepting(&self) -> bool {
        self.partial.1 == 0 && self.stacks.iter().any(|s| s.is_empty())
    }

    /// Whether nothing can follow: a whole match that no longer text extends.
    pub fn finished(&self) -> bool {
        self.partial.1 == 0 && self.stacks.iter().all(|s| s.is_empty())
    }

    /// Whether the text so far is a prefix of some match.
    pub fn alive(&self) -> bool {
        !self.stacks.is_empty()
    }

    /// For each byte, whether it may come next (a quick test before a token's bytes are
    /// pushed): an ASCII character some stack takes, or the first byte of a UTF-8 character
    /// some stack may take; every byte while a character is unfinished.
    pub fn first_bytes(&self) -> [bool; 256] {
        let mut ok = [false; 256];
        if self.partial.1 > 0 {
            return [true; 256];
        }
        let tops: Vec<&Elem> = self
            .stacks
            .iter()
            .filter_map(|s| s.last())
            .map(|t| &self.g.rules[t.rule as usize][t.alt as usize][t.idx as usize])
            .collect();
        for (b, slot) in ok.iter_mut().enumerate() {
            if let Some((lead, due, _)) = utf8_lead(b as u8) {
                let (lo, hi) = char_range(lead, due, due + 1);
                *slot = tops.iter().any(|e| e.may_match(lo, hi));
            }
        }
        ok
    }

    /// Advances by one code point; false when no match continues with it (the state is then
    /// dead).
    pub fn push_char(&mut self, cp: u32) -> bool {
        let mut step = Step::default();
        for s in &self.stacks {
            let Some(&top) = s.last() else { continue };
            if self.g.rules[top.rule as usize][top.alt as usize][top.idx as usize].matches(cp) {
                let mut s = s.clone();
                if let Some(t) = s.last_mut() {
                    t.idx += 1;
                }
                step.expand(&self.g, s);
            }
        }
        self.finish(step);
        self.alive()
    }

    /// Advances by the bytes of a token (UTF-8, possibly ending inside a character); false when
    /// no match continues with them.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            let (val, due, len) = self.partial;
            if due == 0 {
                let Some((v, d, next)) = utf8_lead(b) else {
                    self.stacks.clear();
                    return false;
                };
                self.partial = (v, d, d + 1);
                self.next = next;
            } else if (self.next.0..=self.next.1).contains(&b) {
                self.partial = ((val << 6) | (b & 0x3f) as u32, due - 1, len);
                self.next = (0x80, 0xbf);
            } else {
                self.stacks.clear();
                return false;
            }
            if self.partial.1 == 0 && !self.push_char(self.partial.0) {
                return false;
            }
        }
        let (val, due, len) = self.partial;
        if due > 0 {
            // Some character beginning with these bytes must be able to come next.
            let (lo, hi) = char_range(val, due, len);
            let ok = self.stacks.iter().any(|s| {
                s.last().is_some_and(|t| {
                    self.g.rules[t.rule as usize][t.alt as usize][t.idx as usize].may_match(lo, hi)
                })
            });
            if !ok {
                self.stacks.clear();
            }
        }
        self.alive()
    }
}

/// The bits a UTF-8 lead byte carries, the continuation bytes it asks for and the bytes the
/// first of them may be (well-formed UTF-8 only: no overlong form, surrogate or code point
/// over U+10FFFF; `constrain`'s JSON mode reads it too); `None` for a byte no well-formed
/// character starts with.
pub(crate) fn utf8_lead(b: u8) -> Option<(u32, u8, (u8, u8))> {
    let any = (0x80, 0xbf);
    match b {
        0x00..=0x7f => Some((b as u32, 0, any)),
        0xc2..=0xdf => Some(((b & 0x1f) as u32, 1, any)),
        0xe0 => Some((0, 2, (0xa0, 0xbf))),
        0xed => Some((0xd, 2, (0x80, 0x9f))),
        0xe1..=0xef => Some(((b & 0x0f) as u32, 2, any)),
        0xf0 => Some((0, 3, (0x90, 0xbf))),
        0xf4 => Some((4, 3, (0x80, 0x8f))),
        0xf1..=0xf3 => Some(((b & 0x07) as u32, 3, any)),
        _ => None,
    }
}

/// The code points a character of `len` bytes may be whose first bits are `val`, with `due`
/// continuation bytes still to come (the shortest form only, no surrogate, at most U+10FFFF).
fn char_range(val: u32, due: u8, len: u8) -> (u32, u32) {
    let shift = 6 * due as u32;
    let min = [0, 0, 0x80, 0x800, 0x10000][len as usize];
    let lo = (val << shift).max(min);
    let hi = ((val << shift) | ((1 << shift) - 1)).min(0x10ffff);
    // After the lead byte 0xed only U+D000..U+D7FF are left (the rest are surrogates).
    if (0xd800..=0xdfff).contains(&hi) {
        (lo, 0xd7ff)
    } else {
        (lo, hi)
    }
}

/// The stacks one character leads to, each followed once (as llama.cpp's
/// `llama_grammar_advance_stack` does): where an item matches empty in several ways, the ways
/// meet in the same stacks instead of multiplying.
#[derive(Default)]
struct Step {
    /// Every stack met, so that none is followed twice.
    seen: HashSet<Vec<Pos>>,
    /// The stacks with a character class on top (or empty: a whole match).
    out: Vec<Vec<Pos>>,
    /// Whether more than [`MAX_STEP_STACKS`] stacks were met (the step then stopped).
    over: bool,
}

impl Step {
    /// Adds to `out` every stack that `stack` stands for with a character class on top (or
    /// empty), following rule references and popping finished sequences.
    fn expand(&mut self, g: &Grammar, stack: Vec<Pos>) {
        // A work list rather than recursion: chains of rule references and deeply nested
        // matches (which may finish many sequences at once) cannot overflow the thread's stack.
        if self.over {
            return;
        }
        let mut work = vec![stack];
        while let Some(mut stack) = work.pop() {
            let (top, seq) = loop {
                let Some(&top) = stack.last() else {
                    break (None, &[][..]);
                };
                let seq = &g.rules[top.rule as usize][top.alt as usize];
                if (top.idx as usize) < seq.len() {
                    break (Some(top), seq.as_slice());
                }
                stack.pop();
            };
            if self.seen.contains(&stack) {
                continue;
            }
            if self.seen.len() == MAX_STEP_STACKS {
                self.over = true;
                return;
            }
            self.seen.insert(stack.clone());
            let Some(top) = top else {
                self.out.push(stack);
                continue;
            };
            match &seq[top.idx as usize] {
                Elem::Char { .. } => self.out.push(stack),
                &Elem::Rule(r) => {
                    // The continuation after the reference; dropped when nothing follows, so
                    // that right recursion (repetitions) keeps the stacks short.
                    if top.idx as usize + 1 == seq.len() {
                        stack.pop();
                    } else if let Some(t) = stack.last_mut() {
                        t.idx += 1;
                    }
                    let n = g.rules[r as usize].len() as u32;
                    for alt in (0..n).rev() {
                        let mut s = stack.clone();
                        s.push(Pos {
                            rule: r,
                            alt,
                            idx: 0,
                        });
                        work.push(s);
                    }
                }
            }
        }
    }
}

/// A lazy grammar's wait for its triggers: the output read so far, as much of it as a trigger
/// may still need.
#[derive(Clone, Debug)]
struct Waiting {
    words: Vec<Vec<u8>>,
    /// The start triggers that the output so far may still become a match of.
    starts: Vec<GrammarState>,
    /// The output: all of it while a start trigger may match, else its last bytes (fewer than
    /// the longest word's).
    text: Vec<u8>,
}

impl Waiting {
    fn new(triggers: &[Trigger]) -> Waiting {
        let mut words = Vec::new();
        let mut starts = Vec::new();
        for t in triggers {
            match t {
                Trigger::Word(w) => words.push(w.as_bytes().to_vec()),
                Trigger::Start(g) => starts.push(GrammarState::new(g.clone())),
            }
        }
        Waiting {
            words,
            starts,
            text: Vec::new(),
        }
    }

    /// Whether a trigger matches the empty output (the grammar applies from the start).
    fn at_once(&self) -> bool {
        self.words.iter().any(Vec::is_empty) || self.starts.iter().any(GrammarState::accepting)
    }

    /// Reads the next bytes of the output. Once a trigger matches: the output from the start
    /// of its match to the end of `bytes`, which the grammar must take.
    fn read(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        for (i, &b) in bytes.iter().enumerate() {
            self.text.push(b);
            self.starts.retain_mut(|s| s.push_bytes(&[b]));
            let start = match self.starts.iter().any(GrammarState::accepting) {
                true => Some(0),
                false => self
                    .words
                    .iter()
                    .filter(|w| self.text.ends_with(w))
                    .map(|w| self.text.len() - w.len())
                    .min(),
            };
            if let Some(at) = start {
                let mut out = self.text.split_off(at);
                out.extend_from_slice(&bytes[i + 1..]);
                return Some(out);
            }
            if self.starts.is_empty() {
                let longest = self.words.iter().map(Vec::len).max().unwrap_or(0);
                let drop = self.text.len().saturating_sub(longest.saturating_sub(1));
                self.text.drain(..drop);
            }
        }
        None
    }
}

/// A grammar as a sampler's constraint: which tokens keep the text a prefix of a match; once
/// the text is a whole match, end-of-sequence tokens too, and only they once nothing can follow.
#[derive(Clone, Debug)]
pub struct GrammarMode {
    state: GrammarState,
    /// [`GrammarState::first_bytes`] of the state.
    first: [bool; 256],
    bytes: TokenBytes,
    eos: Vec<u32>,
    /// A lazy grammar's wait for its triggers, until one has matched.
    waiting: Option<Waiting>,
}

impl GrammarMode {
    pub fn new(g: Arc<Grammar>, tok: &Tokenizer) -> GrammarMode {
        GrammarMode::from_parts(g, tok.text_bytes(), tok.eos_ids().to_vec())
    }

    /// For tests: a vocabulary of `texts` as tokens 1.., token 0 the end of sequence.
    #[cfg(test)]
    pub(crate) fn over_texts(g: Arc<Grammar>, texts: &[&str]) -> GrammarMode {
        let bytes: Vec<Option<Vec<u8>>> = std::iter::once(None)
            .chain(texts.iter().map(|t| Some(t.as_bytes().to_vec())))
            .collect();
        GrammarMode::from_parts(g, Arc::new(bytes), vec![0])
    }

    /// From each token's bytes (`None`: a special token, never allowed) and the
    /// end-of-sequence tokens.
    pub fn from_parts(g: Arc<Grammar>, bytes: TokenBytes, eos: Vec<u32>) -> Self {
        let waiting =
            Some(Waiting::new(&g.triggers)).filter(|w| !g.triggers.is_empty() && !w.at_once());
        let state = GrammarState::new(g);
        GrammarMode {
            first: state.first_bytes(),
            state,
            bytes,
            eos,
            waiting,
        }
    }

    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        if let Some(waiting) = &self.waiting {
            // Free text, unless the token completes a trigger: then the grammar must take the
            // output from the start of the trigger's match to the token's end.
            let Some(Some(b)) = self.bytes.get(token as usize) else {
                return true;
            };
            return match waiting.clone().read(b) {
                None => true,
                Some(text) => self.state.clone().push_bytes(&text),
            };
        }
        if self.eos.contains(&token) {
            return self.state.accepting();
        }
        match self.bytes.get(token as usize) {
            Some(Some(b)) if !b.is_empty() && self.first[b[0] as usize] => {
                self.state.clone().push_bytes(b)
            }
            _ => false,
        }
    }

    /// Records the token sampled.
    pub fn accept(&mut self, token: u32) {
        let Some(Some(b)) = self.bytes.get(token as usize) else {
            return;
        };
        match &mut self.waiting {
            None => {
                self.state.push_bytes(b);
            }
            Some(waiting) => {
                let Some(text) = waiting.read(b) else { return };
                self.waiting = None;
                self.state.push_bytes(&text);
            }
        }
        self.first = self.state.first_bytes();
    }

    /// The end-of-sequence tokens.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(g: &str, text: &str) -> bool {
        let mut s = GrammarState::new(Arc::new(Grammar::parse(g).unwrap()));
        s.push_bytes(text.as_bytes()) && s.accepting()
    }

    fn prefix(g: &str, text: &str) -> bool {
        let mut s = GrammarState::new(Arc::new(Grammar::parse(g).unwrap()));
        s.push_bytes(text.as_bytes())
    }

    /// A chain of rules as long as the limit allows: matched, and its left recursion found.
    /// (The fixed points took a round over all rules per rule of such a chain: about 4e9 steps
    /// here, where the work list takes one per reference.)
    #[test]
    fn long_rule_chains() {
        let n = MAX_RULES - 3;
        let chain = |last: &str| {
            let mut g = String::from("root ::= r1\n");
            for i in 1..n {
                g += &format!("r{i} ::= r{}\n", i + 1);
            }
            g + &format!("r{n} ::= {last}\n")
        };
        assert!(accepts(&chain(r#""x""#), "x"));
        assert!(!accepts(&chain(r#""x""#), "xx"));
        let e = Grammar::parse(&chain(r#"root "x""#)).unwrap_err();
        assert!(e.msg.contains("rule 'r1' is left-recursive"), "{e}");
        // The whole chain matches empty text, so `a` can reach itself before any character.
        assert!(Grammar::parse(&chain(r#""x"?"#)).is_ok());
        let e = Grammar::parse(&(chain(r#""x"?"#) + "a ::= r1 a \"z\"\n")).unwrap_err();
        assert!(e.msg.contains("rule 'a' is left-recursive"), "{e}");
    }

    #[test]
    fn literals_alternatives_and_classes() {
        let g = r#"root ::= "yes" | "no" | [0-9]+"#;
        for t in ["yes", "no", "0", "123"] {
            assert!(accepts(g, t), "{t}");
        }
        for t in ["ye", "", "1a", "yesno", "-1"] {
            assert!(!accepts(g, t), "{t}");
        }
        assert!(prefix(g, "ye"));
        assert!(!prefix(g, "x"));
    }

    #[test]
    fn repetitions() {
        let g = r#"root ::= "a"{2,4} "b"? ("cd")* "e"{3}"#;
        for t in ["aaeee", "aaaabeee", "aacdcdeee", "aaabcdeee"] {
            assert!(accepts(g, t), "{t}");
        }
        for t in ["aeee", "aaaaaeee", "aabbeee", "aaee", "aaeeee", "aacdceee"] {
            assert!(!accepts(g, t), "{t}");
        }
        let g = r#"root ::= [a-z]{2,}"#;
        assert!(accepts(g, "ab") && accepts(g, "abcdefgh") && !accepts(g, "a"));
    }

    #[test]
    fn negated_classes_any_char_escapes_and_unicode() {
        let g = r#"root ::= "\"" [^"\\\n]* "\"" "\n""#;
        assert!(accepts(g, "\"héllo, 世界\"\n"));
        assert!(!accepts(g, "\"a\"b\"\n"));
        assert!(accepts(r#"root ::= . . "\x41\u00e9""#, "日xAé"));
        assert!(accepts(r#"root ::= [\u4e00-\u9fff]+"#, "世界"));
        assert!(!accepts(r#"root ::= [\u4e00-\u9fff]+"#, "abc"));
        // A token ending inside a character: allowed when some character with that start fits.
        let g = Arc::new(Grammar::parse(r#"root ::= "é" | "x""#).unwrap());
        let mut s = GrammarState::new(g.clone());
        assert!(s.push_bytes(&[0xc3]));
        assert!(!s.accepting());
        assert!(s.push_bytes(&[0xa9]) && s.accepting());
        let mut s = GrammarState::new(g);
        assert!(!s.push_bytes(&[0xe4]), "no three-byte character fits");
    }

    #[test]
    fn rules_comments_and_line_breaks() {
        let g = "# a list\nroot ::= item (\",\" ws item)*   # items\nitem ::= [a-z]+\n\nws ::= \" \"?\n";
        assert!(accepts(g, "a, bc,d"));
        assert!(!accepts(g, "a,,b"));
        let g = "root ::= (\n  \"a\" |\n  \"b\"\n) \"c\"\n";
        assert!(accepts(g, "ac") && accepts(g, "bc") && !accepts(g, "c"));
        let g = "root ::=\n  \"x\"\n  | \"y\"";
        assert!(accepts(g, "x") && accepts(g, "y"));
        // Names like those made for groups are the grammar's own.
        let g = "root ::= (\"a\") root-0\nroot-0 ::= \"c\"";
        assert!(accepts(g, "ac"));
    }

    #[test]
    fn recursion_and_nesting() {
        let g = r#"root ::= "(" root ")" | "" "#;
        assert!(accepts(g, "((()))") && accepts(g, ""));
        assert!(!accepts(g, "(()") && !accepts(g, "())"));
        assert!(prefix(g, "((("));
    }

    #[test]
    fn finished_and_accepting() {
        let g = Arc::new(Grammar::parse(r#"root ::= "a" "b"?"#).unwrap());
        let mut s = GrammarState::new(g);
        assert!(!s.accepting());
        s.push_bytes(b"a");
        assert!(s.accepting() && !s.finished());
        s.push_bytes(b"b");
        assert!(s.accepting() && s.finished());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |g: &str| Grammar::parse(g).unwrap_err().to_string();
        assert!(e("item ::= \"a\"").contains("no rule named 'root'"));
        assert!(e("root ::= item").contains("'item' is used but not defined"));
        assert!(e("root ::= root \"a\" | \"b\"").contains("left-recursive"));
        let msg = e("root ::= ( \"a\"? root \"c\" ) | \"b\"");
        assert!(
            msg.starts_with("line 1 column 27: rule 'root-") && msg.contains("left-recursive"),
            "{msg}"
        );
        // Loops that match empty but leave nothing after the return end, as in llama.cpp.
        assert!(accepts(r#"root ::= ("a"?)*"#, "aaa") && accepts(r#"root ::= ("a"?)*"#, ""));
        let g = "root ::= (ws)* \"x\"\nws ::= \" \"?";
        assert!(accepts(g, "   x") && accepts(g, "x") && !accepts(g, " y"));
        assert!(accepts(r#"root ::= ([a-z]*)+ "." "#, "ab."));
        assert!(e("root ::= a | \"x\"\na ::= b\nb ::= a").contains("left-recursive"));
        assert!(e("root ::= x\nx ::= y? x \"a\"\ny ::= \"b\"").contains("left-recursive"));
        assert!(e("root ::= \"abc").contains("unterminated literal"));
        assert!(e("root ::= [a-").contains("unterminated character class"));
        assert!(e("root ::= \"a\"\nroot ::= \"b\"").contains("defined twice"));
        assert!(e("root = \"a\"").contains("'::='"));
        assert!(e("root ::= \"a\"{3,2}").contains("n < m"));
        assert!(e("root ::= \"a\"{5000}").contains("repetition over"));
        assert!(e("root ::= (\"a\" ").contains("')'"));
        assert!(e("root ::= \"\\q\"").contains("unknown escape"));
        assert!(e("root ::= [z-a]").contains("out of order"));
        let err = Grammar::parse("root ::= \"a\"\nx ::= ) \"b\"").unwrap_err();
        assert_eq!((err.line, err.col), (2, 7), "{err}");
    }

    #[test]
    fn first_bytes_admit_exactly_what_a_push_may_take() {
        let g = Arc::new(
            Grammar::parse(r#"root ::= [a-c] ("é" | [\u4e00-\u4e01] | [^x-z]) "!" | "\n""#)
                .unwrap(),
        );
        let mut states = vec![GrammarState::new(g.clone())];
        let mut s = GrammarState::new(g);
        s.push_bytes(b"b");
        states.push(s.clone());
        s.push_bytes("é".as_bytes());
        states.push(s);
        for st in &states {
            // Some character starting with b that the state takes <=> the filter lets b by.
            let mut may = [false; 256];
            let mut buf = [0u8; 4];
            for c in (0..=0x10ffffu32).filter_map(char::from_u32) {
                let bytes = c.encode_utf8(&mut buf).as_bytes();
                if !may[bytes[0] as usize] && st.clone().push_bytes(bytes) {
                    may[bytes[0] as usize] = true;
                }
            }
            assert_eq!(st.first_bytes(), may, "{:?}", st.stacks);
        }
    }

    /// A mode over `vocab` (token 0: the end of sequence) for `g`.
    fn mode(g: Grammar, vocab: &[&str]) -> GrammarMode {
        GrammarMode::over_texts(Arc::new(g), vocab)
    }

    #[test]
    fn a_lazy_grammar_applies_from_its_trigger_word() {
        let lazy = || {
            Grammar::parse(r#"root ::= "<t>" [0-9]+ ";""#)
                .unwrap()
                .lazy(vec![Trigger::Word("<t>".into())])
        };
        let vocab = ["hi ", "<", "t>", "<t>1", "<t>x", "1", "2", ";", "x"];
        let mut m = mode(lazy(), &vocab);
        // Before the trigger anything goes, the end included; a token completing it must go on
        // with a match.
        assert!((0..10).filter(|&t| t != 5).all(|t| m.allows(t)));
        assert!(!m.allows(5), "<t>x");
        m.accept(1);
        m.accept(2);
        assert!(m.allows(3) && m.allows(9));
        m.accept(3); // "<" + "t>": triggered across two tokens, the grammar reads "<t>"
        assert!(!m.allows(9) && !m.allows(0) && !m.allows(8) && m.allows(6));
        m.accept(6);
        m.accept(7);
        assert!(m.allows(8) && !m.allows(0));
        m.accept(8);
        assert!(m.allows(0) && !m.allows(6));
        // The trigger inside one token, with the first of the match after it.
        let mut m = mode(lazy(), &["<t>1", ";"]);
        m.accept(1);
        assert!(m.allows(2) && !m.allows(0));
        // Without triggers the grammar applies from the start; an empty word matches at once.
        for g in [
            Grammar::parse(r#"root ::= "<t>" [0-9]+ ";""#).unwrap(),
            lazy().lazy(vec![Trigger::Word(String::new())]),
        ] {
            let m = mode(g, &["hi", "<t>1"]);
            assert!(!m.allows(1) && m.allows(2));
        }
    }

    /// A start trigger: the grammar reads the output from its start once the output is a match
    /// of the trigger; text that begins like one and diverges, or a match later in the
    /// output, is free.
    #[test]
    fn a_lazy_grammar_applies_from_the_start_when_a_start_trigger_matches() {
        let lazy = || {
            let start = Grammar::parse(r#"root ::= " "* "{k""#).unwrap();
            Grammar::parse(r#"root ::= " "* "{" [a-z]+ "}" | "<t>" [0-9]+"#)
                .unwrap()
                .lazy(vec![
                    Trigger::Start(Arc::new(start)),
                    Trigger::Word("<t>".into()),
                ])
        };
        let vocab = [
            " ", "{", "k", "{k", "{k!", "{kz", "}", "!", "x {k", "{j", "<t>", "1",
        ];
        let mut m = mode(lazy(), &vocab);
        // Whole in one token: the grammar must take what follows in it.
        assert!(m.allows(4) && m.allows(6) && !m.allows(5));
        // Across tokens, after leading spaces.
        m.accept(1);
        m.accept(1);
        m.accept(2);
        assert!(
            m.allows(3) && m.allows(8) && m.allows(0),
            "not triggered yet"
        );
        m.accept(3);
        assert!(!m.allows(8) && !m.allows(0) && m.allows(3) && m.allows(7));
        m.accept(3);
        m.accept(7);
        assert!(m.allows(0) && !m.allows(3));
        // Not at the start: free, also where a match of the trigger follows.
        let mut m = mode(lazy(), &vocab);
        m.accept(9);
        assert!(m.allows(8) && m.allows(5) && m.allows(0));
        m.accept(5);
        assert!(m.allows(8) && m.allows(0));
        // Diverging from the trigger: free, however the text goes on.
        let mut m = mode(lazy(), &vocab);
        m.accept(10);
        assert!(m.allows(8) && m.allows(3) && m.allows(0));
        // A trigger word later in the output still applies, from its own start.
        m.accept(11);
        assert!(m.allows(12) && !m.allows(0) && !m.allows(8));
        // A start trigger that matches the empty output applies at once.
        let g = Grammar::parse(r#"root ::= "{" [a-z]+ "}""#)
            .unwrap()
            .lazy(vec![Trigger::Start(Arc::new(
                Grammar::parse(r#"root ::= " "*"#).unwrap(),
            ))]);
        let m = mode(g, &vocab);
        assert!(m.allows(2) && !m.allows(1) && !m.allows(0));
    }

    #[test]
    fn limits_keep_bad_grammars_from_running_away() {
        let e = |g: &str| Grammar::parse(g).unwrap_err().to_string();
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(500), ")".repeat(500));
        assert!(e(&deep).contains("nested over 128"), "{}", e(&deep));
        let many: String = (0..70000).map(|i| format!("r{i} ::= \"a\"\n")).collect();
        assert!(e(&format!("root ::= \"a\"\n{many}")).contains("at most 65536"));
        // Refused as soon as the limit passes, not after 3000 x 1000 rules were built.
        let t = std::time::Instant::now();
        let big: String = (0..3000)
            .map(|i| format!("r{i} ::= \"a\"{{0,1000}}\n"))
            .collect();
        let msg = e(&format!("root ::= \"a\"\n{big}"));
        assert!(
            msg.contains("65537 rules") && msg.starts_with("line 67 "),
            "{msg}"
        );
        assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
        // A long chain of rules (no recursion on the way) and a deep match are fine.
        let chain: String = (0..5000)
            .map(|i| format!("r{i} ::= r{}\n", i + 1))
            .collect();
        let g = format!("root ::= r0\n{chain}r5000 ::= \"z\"\n");
        assert!(accepts(&g, "z"));
        let g = r#"root ::= "(" root ")" | "x""#;
        let n = 3000;
        assert!(accepts(g, &format!("{}x{}", "(".repeat(n), ")".repeat(n))));
    }

    #[test]
    fn empty_matches_in_two_ways_do_not_multiply_the_stacks() {
        // Each repetition of the item matches empty in two ways; the stacks are followed once.
        let g = Arc::new(Grammar::parse("root ::= ((\" \"?)?){0,40} \"x\"").unwrap());
        let t = std::time::Instant::now();
        for text in [" x", "x", "     x"] {
            let mut s = GrammarState::new(g.clone());
            assert!(s.push_bytes(text.as_bytes()) && s.accepting(), "{text:?}");
        }
        assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
        let mut s = GrammarState::new(g);
        assert!(!s.push_bytes(b"xx") && s.error().is_none());
    }

    #[test]
    fn a_step_past_the_stack_limit_is_an_error() {
        // Nested 300 x 300 repetitions stay well within the limit.
        assert!(accepts(r#"root ::= ("a"{0,300}){0,300} "b""#, "aaab"));
        // 4^9 ways to stand before the first character: more stacks than a step may visit.
        let levels: String = (0..9)
            .map(|i| {
                format!(
                    "l{i} ::= l{0} \"a\" | l{0} \"b\" | l{0} \"c\" | l{0} \"d\"\n",
                    i + 1
                )
            })
            .collect();
        let g = Grammar::parse(&format!("root ::= l0\n{levels}l9 ::= \"x\"\n")).unwrap();
        let s = GrammarState::new(Arc::new(g));
        assert!(
            !s.alive() && s.error().unwrap().contains("65536"),
            "{:?}",
            s.error()
        );
    }

    #[test]
    fn only_well_formed_utf8_gets_through() {
        let bad: [&[u8]; 5] = [
            &[0xe0, 0x81, 0x81],       // overlong
            &[0xed, 0xa0, 0x80],       // a surrogate
            &[0xf4, 0x90, 0x80, 0x80], // over U+10FFFF
            &[0xf0, 0x80, 0x80, 0x80], // overlong
            &[0xc1, 0x81],             // overlong
        ];
        for g in [
            "root ::= .",
            r#"root ::= [^"]"#,
            r#"root ::= [\x00-\U0010ffff]"#,
        ] {
            for b in bad {
                let mut s = GrammarState::new(Arc::new(Grammar::parse(g).unwrap()));
                assert!(!s.push_bytes(b), "{g} {b:02x?}");
            }
            for c in ["\u{800}", "\u{d7ff}", "\u{e000}", "\u{10000}", "\u{10ffff}"] {
                assert!(accepts(g, c), "{g} {c:?}");
            }
        }
        // Only surrogates are left after 0xed for a class that takes none of U+D000..U+D7FF.
        let s = GrammarState::new(Arc::new(
            Grammar::parse(r#"root ::= [^\ud000-\ud7ff]"#).unwrap(),
        ));
        assert!(!s.first_bytes()[0xed] && s.first_bytes()[0xee]);
        // The JSON schema's strings too.
        let text =
            crate::json_schema::schema_to_gbnf(&serde_json::json!({"type": "string"})).unwrap();
        let g = Arc::new(Grammar::parse(&text).unwrap());
        for b in bad {
            let doc = [&b"\""[..], b, b"\""].concat();
            assert!(!GrammarState::new(g.clone()).push_bytes(&doc), "{b:02x?}");
        }
    }

    #[test]
    fn ambiguity_past_the_stack_limit_is_an_error_not_a_rejection() {
        let g = Arc::new(
            Grammar::parse("root ::= s\ns ::= \"a\" s \"b\" | \"a\" s \"c\" | \"x\"").unwrap(),
        );
        // After k "a"s, 3 * 2^k stacks: 10 fit, 13 do not.
        let text = format!("{}x{}c", "a".repeat(10), "b".repeat(9));
        let mut s = GrammarState::new(g.clone());
        assert!(s.push_bytes(text.as_bytes()) && s.accepting());
        let mut s = GrammarState::new(g);
        assert!(!s.push_bytes(&[b'a'; 13]));
        assert!(
            s.error().unwrap().contains("beyond 4096"),
            "{:?}",
            s.error()
        );
    }

    #[test]
    fn classes_of_touching_ranges_and_hex_escapes() {
        // Together the ranges cover all that may follow 0xc2: it may not start a character.
        let g = r#"root ::= [^\u0080-\u009f\u00a0-\u00bf] | "x""#;
        let s = GrammarState::new(Arc::new(Grammar::parse(g).unwrap()));
        assert!(!s.first_bytes()[0xc2] && s.first_bytes()[0xc3]);
        assert!(!s.clone().push_bytes(&[0xc2]) && s.clone().push_bytes(&[0xc3]));
        assert!(accepts(g, "x") && accepts(g, "é") && !accepts(g, "\u{a0}"));
        assert!(accepts("root ::= [b-cab]+", "abcba") && !accepts("root ::= [b-cab]+", "d"));
        for bad in [
            r#"root ::= "\x+1""#,
            r#"root ::= "\u+041""#,
            r#"root ::= [\x-1]"#,
        ] {
            let e = Grammar::parse(bad).unwrap_err().to_string();
            assert!(e.contains("hexadecimal digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn long_repetitions_keep_the_stacks_short() {
        let g = Arc::new(Grammar::parse("root ::= ([a-z] | \" \")* \".\"").unwrap());
        let mut s = GrammarState::new(g);
        for _ in 0..2000 {
            assert!(s.push_bytes(b"ab "));
        }
        assert!(s.stacks.iter().all(|st| st.len() <= 3), "{:?}", s.stacks);
        assert!(s.push_bytes(b".") && s.finished());
    }
}
