//! A bounded pre-scan of PyTorch checkpoints (`torch.save` zip files) before
//! Candle's pickle reader sees them.
//!
//! Candle's reader never executes a pickle. But it builds every object as a
//! deep value: memo entries are copied on each put and get, and nested lists
//! are recursed into. A 2.5 MB pickle of 10⁶ nested lists therefore
//! overflows the stack (an abort, not an error), and a 22 KB pickle that
//! re-reads a growing memo entry allocates gigabytes. Checkpoints come
//! from third-party links, so this is a trust boundary.
//!
//! [`check_file`] runs the same opcodes on sizes instead of values:
//! - every value's nesting depth and node count, where a copy costs what
//!   Candle's copy costs;
//! - the stack and memo sizes;
//! - every global the pickle names.
//!
//! It refuses the file, with the reason, when any of these holds:
//! - nesting deeper than [`MAX_DEPTH`];
//! - more than [`MAX_NODES`] nodes built in all (copies included);
//! - a stack or memo larger than [`MAX_ITEMS`];
//! - a global outside the allow-list of what state dicts hold: tensors,
//!   storages, `OrderedDict`, numpy scalars.
//!
//! These bounds are far above real checkpoints: a ViT-L/14 state dict with
//! optimizer state builds about 10⁵ nodes at depth 8. The scan is linear in
//! the pickle's size and keeps two integers per value.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Deepest nesting of containers accepted.
pub const MAX_DEPTH: u32 = 200;
/// Nodes Candle would build, copies included.
pub const MAX_NODES: u64 = 4_000_000;
/// Entries on the stack or in the memo.
pub const MAX_ITEMS: usize = 1_000_000;
/// Size of the pickle itself (`data.pkl`; tensors live in other entries).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("it is not a plain PyTorch state dict: it names `{0}`, which a state dict does not hold (save `model.state_dict()` with torch.save)")]
    Global(String),
    #[error("it is not a plain PyTorch state dict: values nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("it is not a plain PyTorch state dict: reading it would build more than {MAX_NODES} objects (a pickle bomb?)")]
    TooBig,
    #[error(
        "it is not a plain PyTorch state dict: more than {MAX_ITEMS} entries on its stack or memo"
    )]
    TooManyItems,
    #[error("its pickle (`{name}`) is {bytes} bytes, more than the {MAX_PICKLE_BYTES} a state dict needs")]
    PickleTooLarge { name: String, bytes: u64 },
    #[error("its pickle is malformed: {0}")]
    Malformed(String),
    #[error("it is not a PyTorch zip checkpoint ({0}); re-save it with torch.save from PyTorch 1.6 or later, or convert it to .safetensors")]
    NotZip(String),
}

/// Checks every `data.pkl` of a PyTorch zip checkpoint.
pub fn check_file(path: &Path) -> Result<(), PickleError> {
    let file = std::fs::File::open(path).map_err(|e| PickleError::NotZip(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| PickleError::NotZip(e.to_string()))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    for name in names {
        let mut entry = zip
            .by_name(&name)
            .map_err(|e| PickleError::Malformed(format!("{name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(PickleError::PickleTooLarge {
                bytes: entry.size(),
                name,
            });
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        (&mut entry)
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| PickleError::Malformed(format!("{name}: {e}")))?;
        check(&bytes)?;
    }
    Ok(())
}

/// Size of a value as Candle would build it.
#[derive(Clone, Copy, Debug)]
struct Shape {
    depth: u32,
    nodes: u64,
    mark: bool,
}

impl Shape {
    const LEAF: Shape = Shape {
        depth: 1,
        nodes: 1,
        mark: false,
    };
}

struct Scan {
    stack: Vec<Shape>,
    memo: HashMap<u32, Shape>,
    built: u64,
}

impl Scan {
    fn push(&mut self, s: Shape) -> Result<(), PickleError> {
        if s.depth > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        if self.stack.len() >= MAX_ITEMS {
            return Err(PickleError::TooManyItems);
        }
        self.stack.push(s);
        Ok(())
    }

    /// Counts `nodes` newly built (a copy or a new container).
    fn build(&mut self, nodes: u64) -> Result<(), PickleError> {
        self.built = self.built.saturating_add(nodes);
        if self.built > MAX_NODES {
            return Err(PickleError::TooBig);
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Shape, PickleError> {
        match self.stack.pop() {
            Some(s) if !s.mark => Ok(s),
            _ => Err(PickleError::Malformed(
                "a value was expected on the stack".into(),
            )),
        }
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Shape>, PickleError> {
        let at = self
            .stack
            .iter()
            .rposition(|s| s.mark)
            .ok_or_else(|| PickleError::Malformed("no mark on the stack".into()))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A container of `items` (plus `extra` nodes of its own).
    fn container(items: &[Shape], extra: u64) -> Shape {
        Shape {
            depth: 1 + items.iter().map(|s| s.depth).max().unwrap_or(0),
            nodes: items.iter().fold(extra, |n, s| n.saturating_add(s.nodes)),
            mark: false,
        }
    }

    /// Adds `items` to the container on top of the stack.
    fn extend_top(&mut self, items: &[Shape]) -> Result<(), PickleError> {
        let top = self
            .stack
            .last_mut()
            .filter(|s| !s.mark)
            .ok_or_else(|| PickleError::Malformed("append to nothing".into()))?;
        for s in items {
            top.depth = top.depth.max(s.depth + 1);
            top.nodes = top.nodes.saturating_add(s.nodes);
        }
        if top.depth > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        Ok(())
    }
}

/// Scans one pickle.
pub fn check(bytes: &[u8]) -> Result<(), PickleError> {
    let mut r = Reader { bytes, at: 0 };
    let mut s = Scan {
        stack: Vec::new(),
        memo: HashMap::new(),
        built: 0,
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.take(1)?;
            }
            // GLOBAL: module and name, each ending in a newline.
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                if !allowed_global(&module, &name) {
                    return Err(PickleError::Global(format!("{module}.{name}")));
                }
                s.build(1)?;
                s.push(Shape::LEAF)?;
            }
            b'K' => leaf(&mut s, &mut r, 1)?,
            b'M' => leaf(&mut s, &mut r, 2)?,
            b'J' => leaf(&mut s, &mut r, 4)?,
            b'G' => leaf(&mut s, &mut r, 8)?,
            b'X' => {
                let n = r.u32()? as usize;
                leaf(&mut s, &mut r, n)?;
            }
            0x8a => {
                let n = r.u8()? as usize;
                leaf(&mut s, &mut r, n)?;
            }
            b'N' | 0x88 | 0x89 => {
                s.build(1)?;
                s.push(Shape::LEAF)?;
            }
            b')' | b']' | b'}' => {
                s.build(1)?;
                s.push(Shape::LEAF)?;
            }
            b'(' => s.push(Shape {
                depth: 0,
                nodes: 0,
                mark: true,
            })?,
            // TUPLE, DICT (from the mark); LIST is not read by Candle.
            b't' | b'd' => {
                let items = s.pop_to_mark()?;
                let c = Scan::container(&items, 1);
                s.build(1)?;
                s.push(c)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(s.pop()?);
                }
                let c = Scan::container(&items, 1);
                s.build(1)?;
                s.push(c)?;
            }
            b'a' => {
                let v = s.pop()?;
                s.extend_top(&[v])?;
            }
            b's' => {
                let v = s.pop()?;
                let k = s.pop()?;
                s.extend_top(&[k, v])?;
            }
            b'e' | b'u' => {
                let items = s.pop_to_mark()?;
                s.extend_top(&items)?;
            }
            // REDUCE, BUILD, NEWOBJ: two values become one.
            b'R' | b'b' | 0x81 => {
                let a = s.pop()?;
                let b = s.pop()?;
                let c = Scan::container(&[a, b], 1);
                s.build(1)?;
                s.push(c)?;
            }
            b'Q' => {
                let v = s.pop()?;
                let c = Scan::container(&[v], 1);
                s.build(1)?;
                s.push(c)?;
            }
            // BINPUT, LONG_BINPUT: Candle stores a copy.
            b'q' | b'r' => {
                let id = if op == b'q' {
                    u32::from(r.u8()?)
                } else {
                    r.u32()?
                };
                let top = *s
                    .stack
                    .last()
                    .filter(|v| !v.mark)
                    .ok_or_else(|| PickleError::Malformed("memo put of nothing".into()))?;
                s.build(top.nodes)?;
                if s.memo.len() >= MAX_ITEMS && !s.memo.contains_key(&id) {
                    return Err(PickleError::TooManyItems);
                }
                s.memo.insert(id, top);
            }
            // BINGET, LONG_BINGET: and hands out another copy.
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(r.u8()?)
                } else {
                    r.u32()?
                };
                let v = *s
                    .memo
                    .get(&id)
                    .ok_or_else(|| PickleError::Malformed(format!("memo {id} is not set")))?;
                s.build(v.nodes)?;
                s.push(v)?;
            }
            b'.' => return Ok(()),
            // Anything else Candle does not read either: let it say so.
            _ => return Ok(()),
        }
    }
}

fn leaf(s: &mut Scan, r: &mut Reader, bytes: usize) -> Result<(), PickleError> {
    r.take(bytes)?;
    s.build(1)?;
    s.push(Shape::LEAF)
}

/// The globals a state dict (and the usual checkpoint dict around it) holds.
fn allowed_global(module: &str, name: &str) -> bool {
    const DTYPES: &[&str] = &[
        "float32",
        "float",
        "float16",
        "half",
        "bfloat16",
        "float64",
        "double",
        "int64",
        "long",
        "int32",
        "int",
        "int16",
        "short",
        "int8",
        "uint8",
        "bool",
        "complex64",
        "complex128",
    ];
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => name.starts_with("_rebuild_"),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch" => name.ends_with("Storage") || name == "Size" || DTYPES.contains(&name),
        "torch.storage" => name == "UntypedStorage" || name == "TypedStorage",
        "numpy.core.multiarray" | "numpy._core.multiarray" => name == "scalar",
        "numpy" => name == "dtype",
        "_codecs" => name == "encode",
        _ => false,
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| PickleError::Malformed("it ends in the middle of a value".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.bytes[self.at..];
        let n = rest
            .iter()
            .take(4096)
            .position(|&b| b == b'\n')
            .ok_or_else(|| PickleError::Malformed("a global name without its newline".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.save`'s shape: protocol 2, an OrderedDict of one tensor.
    fn state_dict() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01");
        p.extend(b"X\x01\x00\x00\x00wq\x02");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x03(");
        p.extend(b"(X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x04tq\x08Q");
        p.extend(b"K\x00K\x02K\x02\x86q\tK\x02K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\r");
        p.extend(b"s.");
        p
    }

    #[test]
    fn a_state_dict_passes() {
        check(&state_dict()).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused_early() {
        // 10^6 nested lists: `]` then `]a` repeated would nest one per
        // level; here each level is an empty list appended to the last.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 1_000_000));
        p.extend(std::iter::repeat_n(b'a', 999_999));
        p.push(b'.');
        assert_eq!(check(&p), Err(PickleError::TooDeep));
        // Nested marks and tuples.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', 200_000));
        p.extend(std::iter::repeat_n(b't', 200_000));
        p.push(b'.');
        assert_eq!(check(&p), Err(PickleError::TooDeep));
    }

    #[test]
    fn a_memo_bomb_is_refused() {
        // A list put in the memo, then fetched twice and appended to itself,
        // over and over: the copies double each round.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend(b"h\x00h\x00a");
            p.extend(b"q\x00");
        }
        p.push(b'.');
        assert_eq!(check(&p), Err(PickleError::TooBig));
    }

    #[test]
    fn globals_outside_the_allow_list_are_named() {
        let mut p = vec![0x80, 2];
        p.extend(b"cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.");
        let e = check(&p).unwrap_err();
        assert_eq!(e, PickleError::Global("os.system".into()));
        assert!(e.to_string().contains("not a plain PyTorch state dict"));
        let mut p = vec![0x80, 2];
        p.extend(b"cargparse\nNamespace\n)R.");
        assert!(matches!(check(&p), Err(PickleError::Global(g)) if g == "argparse.Namespace"));
    }

    #[test]
    fn truncation_and_garbage_are_errors_not_panics() {
        let good = state_dict();
        for cut in 0..good.len() {
            let _ = check(&good[..cut]);
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut p = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % p.len();
                p[i] = (x >> 32) as u8;
            }
            let _ = check(&p);
        }
    }
}
