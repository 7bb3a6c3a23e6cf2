//! A byte-level PostgreSQL lexer and statement splitter: what is code, what is a string, a quoted
//! identifier, a dollar-quoted body or a comment. Every keyword test of the route module runs on
//! these tokens, so a word inside a literal or a comment can never change a routing decision.
//!
//! The lexer never allocates and never fails: unterminated strings or comments end at the end of
//! the text and are flagged `suspect`, which makes the statement "not known to be a read".

/// Tokens kept per statement; beyond this the statement is marked truncated (never parsed, never
/// a read) but still split correctly, so memory stays bounded on a 64 MB query.
pub(crate) const MAX_TOKENS: usize = 1 << 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Unquoted identifier or keyword (may contain `$` and non-ASCII letters).
    Word,
    /// `"quoted identifier"` or `U&"…"`.
    Quoted,
    /// `'…'`, also `N'…'`, `B'…'`, `X'…'`, `U&'…'` (standard-conforming: no backslash escapes).
    Str,
    /// `E'…'` with backslash escapes.
    EStr,
    /// `$tag$…$tag$`.
    Dollar,
    Number,
    /// `$1`.
    Param,
    /// Any other single byte (operators are split into single characters).
    Punct(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
    /// Unterminated literal/identifier, or a standard string whose meaning would change with
    /// `standard_conforming_strings = off` (a quote preceded by an odd run of backslashes).
    pub suspect: bool,
}

impl Token {
    pub(crate) fn is_punct(&self, b: u8) -> bool {
        self.kind == Kind::Punct(b)
    }

    pub(crate) fn is_name(&self) -> bool {
        matches!(self.kind, Kind::Word | Kind::Quoted)
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

pub(crate) struct Lexer<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Lexer {
            bytes: src.as_bytes(),
            pos: 0,
        }
    }

    fn at(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    /// Skips whitespace and comments (nested `/* */` as PostgreSQL does).
    fn skip_trivia(&mut self) {
        loop {
            let b = self.at(self.pos);
            if (b.is_ascii_whitespace() || b == 0x0b) && self.pos < self.bytes.len() {
                self.pos += 1;
            } else if b == b'-' && self.at(self.pos + 1) == b'-' {
                while self.pos < self.bytes.len() && !matches!(self.bytes[self.pos], b'\n' | b'\r') {
                    self.pos += 1;
                }
            } else if b == b'/' && self.at(self.pos + 1) == b'*' {
                let (end, closed) = block_comment(self.bytes, self.pos);
                if !closed {
                    // Left for `next` to report as a suspect token: the server refuses the text.
                    return;
                }
                self.pos = end;
            } else {
                return;
            }
        }
    }

    /// A quote-delimited run starting at `self.pos` (the opening quote). Doubled quotes are
    /// escapes; with `backslash`, `\x` is an escape too (E'' strings).
    fn quoted(&mut self, quote: u8, backslash: bool) -> bool {
        let mut i = self.pos + 1;
        let mut suspect = false;
        let mut backslashes = 0usize;
        while i < self.bytes.len() {
            let b = self.bytes[i];
            if backslash && b == b'\\' {
                i += 2;
                continue;
            }
            if b == quote {
                if quote == b'\'' && backslashes % 2 == 1 {
                    suspect = true;
                }
                if self.at(i + 1) == quote {
                    i += 2;
                    backslashes = 0;
                    continue;
                }
                self.pos = i + 1;
                return suspect;
            }
            backslashes = if b == b'\\' { backslashes + 1 } else { 0 };
            i += 1;
        }
        self.pos = self.bytes.len();
        true
    }

    /// `$tag$` at `self.pos`, if this `$` opens a dollar quote.
    fn dollar_tag_len(&self) -> Option<usize> {
        let mut i = self.pos + 1;
        if self.at(i) == b'$' {
            return Some(2);
        }
        if !is_ident_start(self.at(i)) {
            return None;
        }
        while i < self.bytes.len() && is_ident_cont(self.bytes[i]) && self.bytes[i] != b'$' {
            i += 1;
        }
        (self.at(i) == b'$').then_some(i + 1 - self.pos)
    }
}

/// End of the block comment at `start`, and whether it was closed.
fn block_comment(bytes: &[u8], start: usize) -> (usize, bool) {
    let mut depth = 0usize;
    let mut i = start;
    while i < bytes.len() {
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
            depth = depth.saturating_sub(1);
            i += 2;
            if depth == 0 {
                return (i, true);
            }
        } else {
            i += 1;
        }
    }
    (bytes.len(), false)
}

/// End of the leading comment starting at `start` (`--` or `/*`), for the hint reader.
pub(crate) fn comment_end(bytes: &[u8], start: usize) -> usize {
    if bytes.get(start + 1) == Some(&b'*') {
        block_comment(bytes, start).0
    } else {
        let mut i = start;
        while i < bytes.len() && !matches!(bytes[i], b'\n' | b'\r') {
            i += 1;
        }
        i
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.skip_trivia();
        let start = self.pos;
        let b = *self.bytes.get(start)?;
        let mut suspect = false;
        let next = self.at(start + 1);
        let kind = if b == b'/' && next == b'*' {
            // Only an unclosed comment is left here by `skip_trivia`.
            self.pos = self.bytes.len();
            suspect = true;
            Kind::Punct(b'/')
        } else if matches!(b, b'e' | b'E') && next == b'\'' {
            self.pos += 1;
            suspect = self.quoted(b'\'', true);
            Kind::EStr
        } else if matches!(b, b'n' | b'N' | b'b' | b'B' | b'x' | b'X') && next == b'\'' {
            self.pos += 1;
            suspect = self.quoted(b'\'', false);
            Kind::Str
        } else if matches!(b, b'u' | b'U') && next == b'&' && matches!(self.at(start + 2), b'\'' | b'"') {
            let quote = self.at(start + 2);
            self.pos += 2;
            suspect = self.quoted(quote, false);
            if quote == b'"' { Kind::Quoted } else { Kind::Str }
        } else if is_ident_start(b) {
            while self.pos < self.bytes.len() && is_ident_cont(self.bytes[self.pos]) {
                self.pos += 1;
            }
            Kind::Word
        } else if b == b'\'' {
            suspect = self.quoted(b'\'', false);
            Kind::Str
        } else if b == b'"' {
            suspect = self.quoted(b'"', false);
            Kind::Quoted
        } else if b.is_ascii_digit() || (b == b'.' && next.is_ascii_digit()) {
            self.pos += 1;
            while self.pos < self.bytes.len() {
                let c = self.bytes[self.pos];
                let exponent_sign = matches!(c, b'+' | b'-') && matches!(self.bytes[self.pos - 1], b'e' | b'E');
                if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || exponent_sign) {
                    break;
                }
                // `1..2` is not a number; stop before a second dot run.
                if c == b'.' && self.at(self.pos + 1) == b'.' {
                    break;
                }
                self.pos += 1;
            }
            Kind::Number
        } else if b == b'$' && next.is_ascii_digit() {
            self.pos += 1;
            while self.pos < self.bytes.len() && self.bytes[self.pos].is_ascii_digit() {
                self.pos += 1;
            }
            Kind::Param
        } else if let Some(tag_len) = (b == b'$').then(|| self.dollar_tag_len()).flatten() {
            let tag = &self.bytes[start..start + tag_len];
            let body = start + tag_len;
            match find(&self.bytes[body..], tag) {
                Some(at) => self.pos = body + at + tag_len,
                None => {
                    self.pos = self.bytes.len();
                    suspect = true;
                }
            }
            Kind::Dollar
        } else {
            self.pos += 1;
            Kind::Punct(b)
        };
        Some(Token {
            kind,
            start,
            end: self.pos,
            suspect,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One statement of a (possibly multi-statement) text.
#[derive(Clone, Copy)]
pub(crate) struct Stmt<'a> {
    pub src: &'a str,
    pub toks: &'a [Token],
    /// More than [`MAX_TOKENS`] tokens: `toks` holds only the first ones.
    pub truncated: bool,
}

impl<'a> Stmt<'a> {
    pub(crate) fn start(&self) -> usize {
        self.toks.first().map_or(0, |t| t.start)
    }

    pub(crate) fn end(&self) -> usize {
        self.toks.last().map_or(0, |t| t.end)
    }

    pub(crate) fn text(&self) -> &'a str {
        self.src.get(self.start()..self.end()).unwrap_or("")
    }

    pub(crate) fn tok_text(&self, i: usize) -> &'a str {
        self.toks
            .get(i)
            .and_then(|t| self.src.get(t.start..t.end))
            .unwrap_or("")
    }

    /// Whether token `i` is the unquoted keyword `kw` (given in lower case).
    pub(crate) fn kw(&self, i: usize, kw: &str) -> bool {
        // Hot: called for many keywords per token. Length first, bytes (no char-boundary checks).
        match self.toks.get(i) {
            Some(t) if t.kind == Kind::Word && t.end - t.start == kw.len() => self
                .src
                .as_bytes()
                .get(t.start..t.end)
                .is_some_and(|w| w.eq_ignore_ascii_case(kw.as_bytes())),
            _ => false,
        }
    }

    pub(crate) fn punct(&self, i: usize, b: u8) -> bool {
        self.toks.get(i).is_some_and(|t| t.is_punct(b))
    }

    /// The statement from token `i` on (for EXPLAIN, DECLARE, PREPARE …).
    pub(crate) fn from(&self, i: usize) -> Stmt<'a> {
        Stmt {
            src: self.src,
            toks: self.toks.get(i..).unwrap_or(&[]),
            truncated: self.truncated,
        }
    }

    /// Tokens `i..j` as a statement (for `COPY (query) TO`).
    pub(crate) fn range(&self, i: usize, j: usize) -> Stmt<'a> {
        Stmt {
            src: self.src,
            toks: self.toks.get(i..j).unwrap_or(&[]),
            truncated: self.truncated,
        }
    }

    pub(crate) fn suspect(&self) -> bool {
        self.truncated || self.toks.iter().any(|t| t.suspect)
    }

    /// Index of the parenthesis closing the one at `open`.
    pub(crate) fn closing_paren(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (i, t) in self.toks.iter().enumerate().skip(open) {
            if t.is_punct(b'(') {
                depth += 1;
            } else if t.is_punct(b')') {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(i);
                }
            }
        }
        None
    }

    /// A name (identifier, optionally dotted) starting at token `i`: normalised text and the
    /// index after it. Unquoted parts are lower-cased, quoted ones kept as written.
    pub(crate) fn name_at(&self, i: usize) -> Option<(String, usize)> {
        let mut out = String::new();
        let mut j = i;
        loop {
            let t = self.toks.get(j).filter(|t| t.is_name())?;
            out.push_str(&ident_value(self.src, t));
            j += 1;
            if self.punct(j, b'.') && self.toks.get(j + 1).is_some_and(|t| t.is_name()) {
                out.push('.');
                j += 1;
            } else {
                return Some((out, j));
            }
        }
    }
}

/// The value of an identifier token: lower-cased if unquoted, unescaped if quoted.
pub(crate) fn ident_value(src: &str, t: &Token) -> String {
    let raw = src.get(t.start..t.end).unwrap_or("");
    match t.kind {
        Kind::Quoted if raw.starts_with('"') && raw.len() >= 2 && !t.suspect => {
            raw[1..raw.len() - 1].replace("\"\"", "\"")
        }
        _ => raw.to_ascii_lowercase(),
    }
}

/// The value of a plain string literal (`'…'` or `$$…$$`); `None` for E'', U&'', B'', X''
/// strings and anything suspect, which callers then treat as "not a literal".
pub(crate) fn string_value(src: &str, t: &Token) -> Option<String> {
    let raw = src.get(t.start..t.end)?;
    if t.suspect {
        return None;
    }
    match t.kind {
        Kind::Str if raw.starts_with('\'') && raw.len() >= 2 => Some(raw[1..raw.len() - 1].replace("''", "'")),
        Kind::Dollar => {
            let tag_len = raw[1..].find('$')? + 2;
            raw.get(tag_len..raw.len().checked_sub(tag_len)?).map(str::to_owned)
        }
        _ => None,
    }
}

/// Splits `src` into statements at top-level semicolons and calls `f` on each non-empty one.
/// Semicolons inside parentheses or inside a `BEGIN ATOMIC … END` function body do not split.
pub(crate) fn for_each_statement(src: &str, mut f: impl FnMut(Stmt<'_>)) {
    let mut buf: Vec<Token> = Vec::new();
    let mut truncated = false;
    let mut depth: i64 = 0;
    // BEGIN ATOMIC … END nesting (CASE … END inside it nests too).
    let mut atomic: u32 = 0;
    let mut is_create = false;
    let mut prev_begin = false;
    let mut count = 0usize;
    let word = |t: &Token, kw: &str| t.kind == Kind::Word && src[t.start..t.end].eq_ignore_ascii_case(kw);
    for t in Lexer::new(src) {
        if t.is_punct(b';') && depth <= 0 && atomic == 0 {
            if count > 0 {
                f(Stmt {
                    src,
                    toks: &buf,
                    truncated,
                });
            }
            buf.clear();
            (truncated, depth, is_create, prev_begin, count) = (false, 0, false, false, 0);
            continue;
        }
        if count == 0 {
            is_create = word(&t, "create");
        }
        count += 1;
        if t.is_punct(b'(') {
            depth += 1;
        } else if t.is_punct(b')') {
            depth -= 1;
        } else if is_create && t.kind == Kind::Word {
            if (prev_begin && word(&t, "atomic")) || (atomic > 0 && word(&t, "case")) {
                atomic += 1;
            } else if atomic > 0 && word(&t, "end") {
                atomic -= 1;
            }
            prev_begin = word(&t, "begin");
        }
        if buf.len() < MAX_TOKENS {
            buf.push(t);
        } else {
            truncated = true;
        }
    }
    if count > 0 {
        f(Stmt {
            src,
            toks: &buf,
            truncated,
        });
    }
}
