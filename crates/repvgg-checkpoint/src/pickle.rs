//! A pickle reader that builds data and never runs anything.
//!
//! `torch.save` pickles a state dict as containers, numbers, strings and calls to a handful of
//! torch rebuild functions whose tensor bytes live outside the pickle (persistent ids). This
//! reader understands exactly that: it recognises the allowed globals by name, interprets their
//! calls itself, and refuses any other global at the point it is named, before anything could
//! be called. There is no Python involved, so nothing can be imported or executed either way.

use std::collections::HashMap;

use crate::error::{CheckpointErrorKind, Problem};
use crate::tensor::DType;

/// A storage blob referenced from the pickle by persistent id.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: DType,
}

/// A tensor view onto a storage: what `torch._utils._rebuild_tensor_v2` receives.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The allowed globals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(DType),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

fn allowed_global(module: &str, name: &str) -> Result<Global, Problem> {
    let storage = |dtype| Ok(Global::StorageType(dtype));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "CharStorage") => storage(DType::I8),
        ("torch", "ByteStorage") => storage(DType::U8),
        ("torch", "BoolStorage") => storage(DType::Bool),
        _ => Err(Problem::new(
            CheckpointErrorKind::RefusedGlobal,
            format!(
                "refusing the pickled global '{module}.{name}': a state dict needs only tensors, \
             numbers, strings and containers (nothing was imported or executed)"
            ),
        )),
    }
}

/// Reads one pickle from the start of `bytes`; returns the value and the bytes consumed.
pub fn read_pickle(bytes: &[u8]) -> Result<(Value, usize), Problem> {
    Machine {
        bytes,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        expansion_budget: EXPANSION_BUDGET,
    }
    .run()
}

/// An index into the machine's arena of values.
type NodeId = usize;

/// A value as the machine holds it: containers refer to their items by arena index, so that
/// the memo, the stack and other containers share one container, as Python's references do. A
/// container memoized while empty and filled afterwards reads filled wherever it is recalled.
enum Node {
    Leaf(Value),
    List(Vec<NodeId>),
    Tuple(Vec<NodeId>),
    Dict(Vec<(NodeId, NodeId)>),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Leaf(v) => v.kind(),
            Node::List(_) => "list",
            Node::Tuple(_) => "tuple",
            Node::Dict(_) => "dict",
        }
    }
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<NodeId>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, NodeId>,
    /// What is left of [`EXPANSION_BUDGET`]: every expansion (a call's arguments, the result)
    /// draws on it.
    expansion_budget: usize,
}

/// Values a pickle may expand to in all (its calls' arguments and its result), shared
/// references counted once per place they appear, and a string or bytes value counted once
/// more per [`BYTES_PER_VALUE`] bytes it copies: far above any state dict's needs (about 20
/// values per tensor, so room for 10,000 tensors, and a few kilobytes of strings), and a bound
/// on the time and memory a pickle that refers to one container or one long string many
/// times (or nests references to references) can make us spend.
const EXPANSION_BUDGET: usize = 200_000;

/// Bytes of a copied string or bytes value that cost as much as one more value (so the
/// budget bounds copied text to about 12 MiB).
const BYTES_PER_VALUE: usize = 64;

/// How deeply containers may nest: a state dict needs a handful of levels; the bound keeps the
/// expansion's recursion (and a value that contains itself) from running away.
const MAX_DEPTH: usize = 512;

impl Machine<'_> {
    fn node(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn push(&mut self, node: Node) {
        let id = self.node(node);
        self.stack.push(id);
    }

    /// Puts a value built outside the machine (a call's result) into the arena.
    fn intern(&mut self, value: Value) -> NodeId {
        let node = match value {
            Value::List(items) => Node::List(items.into_iter().map(|v| self.intern(v)).collect()),
            Value::Tuple(items) => Node::Tuple(items.into_iter().map(|v| self.intern(v)).collect()),
            Value::Dict(items) => Node::Dict(
                items
                    .into_iter()
                    .map(|(k, v)| (self.intern(k), self.intern(v)))
                    .collect(),
            ),
            leaf => Node::Leaf(leaf),
        };
        self.node(node)
    }

    /// The value at `id` as a tree, shared containers copied into each place they appear.
    fn expand(&self, id: NodeId, budget: &mut usize, depth: usize) -> Result<Value, Problem> {
        if depth > MAX_DEPTH {
            return Err(Problem::new(
                CheckpointErrorKind::TooLarge,
                format!(
                    "pickle nests containers more than {MAX_DEPTH} deep (or a container holds \
                 itself); a state dict needs a few levels"
                ),
            ));
        }
        let copied = match &self.nodes[id] {
            Node::Leaf(Value::Str(text)) => text.len(),
            Node::Leaf(Value::Bytes(bytes)) => bytes.len(),
            _ => 0,
        };
        let cost = 1 + copied / BYTES_PER_VALUE;
        *budget = budget.checked_sub(cost).ok_or_else(|| {
            Problem::new(
                CheckpointErrorKind::TooLarge,
                "pickle expands to more values (or copies more text) than any state dict holds \
                 (refusing to expand it)",
            )
        })?;
        let items = |ids: &[NodeId], budget: &mut usize| {
            ids.iter()
                .map(|&i| self.expand(i, budget, depth + 1))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &self.nodes[id] {
            Node::Leaf(v) => v.clone(),
            Node::List(ids) => Value::List(items(ids, budget)?),
            Node::Tuple(ids) => Value::Tuple(items(ids, budget)?),
            Node::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| {
                        Ok((
                            self.expand(k, budget, depth + 1)?,
                            self.expand(v, budget, depth + 1)?,
                        ))
                    })
                    .collect::<Result<_, Problem>>()?,
            ),
        })
    }

    /// The value at `id` as a tree, for the few places that read one (a call's arguments, a
    /// persistent id, the result).
    fn value(&mut self, id: NodeId) -> Result<Value, Problem> {
        let mut budget = self.expansion_budget;
        let value = self.expand(id, &mut budget, 0);
        self.expansion_budget = budget;
        value
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Problem> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                Problem::corrupt(format!(
                    "pickle ends early (wanted {n} bytes at offset {})",
                    self.pos
                ))
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, Problem> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Problem> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, Problem> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, Problem> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, Problem> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| Problem::corrupt("pickle ends inside a text line"))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn string(&mut self, len: usize) -> Result<String, Problem> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Problem::corrupt("pickle holds a string that is not UTF-8"))
    }

    fn pop(&mut self) -> Result<NodeId, Problem> {
        self.stack
            .pop()
            .ok_or_else(|| Problem::corrupt("pickle pops an empty stack"))
    }

    /// The container on top of the stack, to be filled in place.
    fn top(&mut self) -> Result<&mut Node, Problem> {
        let id = *self
            .stack
            .last()
            .ok_or_else(|| Problem::corrupt("pickle reads an empty stack"))?;
        Ok(&mut self.nodes[id])
    }

    fn pop_to_mark(&mut self) -> Result<Vec<NodeId>, Problem> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| Problem::corrupt("pickle has no MARK to pop to"))?;
        if mark > self.stack.len() {
            return Err(Problem::corrupt("pickle MARK lies above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn memoize(&mut self, index: u32) -> Result<(), Problem> {
        let id = *self
            .stack
            .last()
            .ok_or_else(|| Problem::corrupt("pickle memoizes from an empty stack"))?;
        self.memo.insert(index, id);
        Ok(())
    }

    fn recall(&mut self, index: u32) -> Result<(), Problem> {
        let id = *self.memo.get(&index).ok_or_else(|| {
            Problem::corrupt(format!(
                "pickle refers to memo entry {index}, which was never stored"
            ))
        })?;
        self.stack.push(id);
        Ok(())
    }

    fn run(mut self) -> Result<(Value, usize), Problem> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let id = self.pop()?;
                    return Ok((self.value(id)?, self.pos));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = allowed_global(&module, &name)?;
                    self.push(Node::Leaf(Value::Global(global)));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.nodes[module], &self.nodes[name]) {
                        (Node::Leaf(Value::Str(m)), Node::Leaf(Value::Str(n))) => {
                            let global = allowed_global(m, n)?;
                            self.push(Node::Leaf(Value::Global(global)))
                        }
                        _ => {
                            return Err(Problem::corrupt(
                                "STACK_GLOBAL without module and name strings",
                            ));
                        }
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memoize(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memoize(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memoize(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.recall(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.recall(i)?
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                0x8f => self.push(Node::List(Vec::new())), // EMPTY_SET
                b'(' => self.marks.push(self.stack.len()),
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(Problem::corrupt("pickle builds a tuple from too few items"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items));
                }
                b'l' | 0x91 => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::List(items));
                }
                b'd' => {
                    let items = self.pop_to_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Node::Dict(pairs));
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.top()? {
                        Node::List(list) => list.push(item),
                        other => {
                            return Err(Problem::corrupt(format!(
                                "pickle appends to a {}",
                                other.kind()
                            )));
                        }
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_to_mark()?;
                    match self.top()? {
                        Node::List(list) => list.extend(items),
                        other => {
                            return Err(Problem::corrupt(format!(
                                "pickle appends to a {}",
                                other.kind()
                            )));
                        }
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    match self.top()? {
                        Node::Dict(dict) => dict.push((key, value)),
                        other => {
                            return Err(Problem::corrupt(format!(
                                "pickle sets an item on a {}",
                                other.kind()
                            )));
                        }
                    }
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    let new_pairs = pairs(items)?;
                    match self.top()? {
                        Node::Dict(dict) => dict.extend(new_pairs),
                        other => {
                            return Err(Problem::corrupt(format!(
                                "pickle sets items on a {}",
                                other.kind()
                            )));
                        }
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Node::Leaf(Value::Int(v as i128)))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Leaf(Value::Int(v as i128)))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Leaf(Value::Int(v as i128)))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = self.long(n)?;
                    self.push(Node::Leaf(v))
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let v = self.long(n)?;
                    self.push(Node::Leaf(v))
                }
                b'I' => {
                    let text = self.line()?;
                    let v =
                        match text.as_str() {
                            "00" => Value::Bool(false),
                            "01" => Value::Bool(true),
                            t => Value::Int(t.parse().map_err(|_| {
                                Problem::corrupt(format!("bad INT '{t}' in pickle"))
                            })?),
                        };
                    self.push(Node::Leaf(v))
                }
                b'L' => {
                    let text = self.line()?;
                    let t = text.trim_end_matches('L');
                    let v = t
                        .parse()
                        .map_err(|_| Problem::corrupt(format!("bad LONG '{t}' in pickle")))?;
                    self.push(Node::Leaf(Value::Int(v)))
                }
                b'F' => {
                    let text = self.line()?;
                    let v = text
                        .parse()
                        .map_err(|_| Problem::corrupt(format!("bad FLOAT '{text}' in pickle")))?;
                    self.push(Node::Leaf(Value::Float(v)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Node::Leaf(Value::Float(v)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Node::Leaf(Value::Str(s)))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Node::Leaf(Value::Str(s)))
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.push(Node::Leaf(Value::Str(s)))
                }
                b'T' | b'U' => {
                    // Python 2 byte strings: latin-1 text as torch's legacy files store them.
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let s = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push(Node::Leaf(Value::Str(s)))
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Leaf(Value::Bytes(b)))
                }
                0x88 => self.push(Node::Leaf(Value::Bool(true))),
                0x89 => self.push(Node::Leaf(Value::Bool(false))),
                b'N' => self.push(Node::Leaf(Value::None)),
                b'0' => {
                    // POP drops the top item, or the topmost mark if nothing lies above it.
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_to_mark()?;
                }
                b'2' => {
                    // DUP pushes the same object again.
                    let id = *self
                        .stack
                        .last()
                        .ok_or_else(|| Problem::corrupt("pickle duplicates an empty stack"))?;
                    self.stack.push(id)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_load(self.value(pid)?)?;
                    self.push(Node::Leaf(storage))
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = call(self.value(callable)?, self.value(args)?)?;
                    let id = self.intern(result);
                    self.stack.push(id)
                }
                b'b' => {
                    // BUILD sets attributes (an OrderedDict's `_metadata`, a tensor's hooks).
                    // Neither matters to the weights, so the state is dropped.
                    self.pop()?;
                    match self.top()? {
                        Node::Dict(_) | Node::Leaf(Value::Tensor(_)) => {}
                        other => {
                            return Err(Problem::corrupt(format!(
                                "pickle sets state on a {}",
                                other.kind()
                            )));
                        }
                    }
                }
                other => {
                    return Err(Problem::corrupt(format!(
                        "unsupported pickle opcode 0x{other:02x} at offset {}",
                        self.pos - 1
                    )));
                }
            }
        }
    }

    /// A little-endian two's-complement integer of `n` bytes.
    fn long(&mut self, n: usize) -> Result<Value, Problem> {
        if n > 16 {
            return Err(Problem::corrupt(format!(
                "pickle holds a {n}-byte integer; at most 16 are supported"
            )));
        }
        let bytes = self.take(n)?;
        let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
            [0xff; 16]
        } else {
            [0; 16]
        };
        buf[..n].copy_from_slice(bytes);
        Ok(Value::Int(i128::from_le_bytes(buf)))
    }
}

fn pairs<T>(items: Vec<T>) -> Result<Vec<(T, T)>, Problem> {
    if !items.len().is_multiple_of(2) {
        return Err(Problem::corrupt(
            "pickle builds a dict from an odd number of items",
        ));
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn as_usize(v: &Value, what: &str) -> Result<usize, Problem> {
    match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i)
            .map_err(|_| Problem::new(CheckpointErrorKind::TooLarge, format!("{what} too large"))),
        other => Err(Problem::corrupt(format!(
            "{what} should be a non-negative int, found {}",
            other.kind()
        ))),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>, Problem> {
    match v {
        Value::Tuple(items) | Value::List(items) => {
            items.iter().map(|i| as_usize(i, what)).collect()
        }
        other => Err(Problem::corrupt(format!(
            "{what} should be a tuple, found {}",
            other.kind()
        ))),
    }
}

/// torch's persistent id: `('storage', StorageType, key, location, numel[, view_metadata])`.
fn persistent_load(pid: Value) -> Result<Value, Problem> {
    let Value::Tuple(items) = pid else {
        return Err(Problem::corrupt(format!(
            "persistent id should be a tuple, found {}",
            pid.kind()
        )));
    };
    match items.as_slice() {
        [
            Value::Str(tag),
            Value::Global(Global::StorageType(dtype)),
            key,
            ..,
        ] if tag == "storage" => {
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => {
                    return Err(Problem::corrupt(format!(
                        "storage key should be a string, found {}",
                        other.kind()
                    )));
                }
            };
            if items.get(5).is_some_and(|v| *v != Value::None) {
                return Err(Problem::new(
                    CheckpointErrorKind::Unsupported,
                    "legacy storage views are not supported",
                ));
            }
            Ok(Value::Storage(StorageRef { key, dtype: *dtype }))
        }
        _ => Err(Problem::corrupt(
            "unrecognised persistent id (not a torch storage)",
        )),
    }
}

fn call(callable: Value, args: Value) -> Result<Value, Problem> {
    let Value::Global(global) = callable else {
        return Err(Problem::corrupt(format!(
            "pickle calls a {}, which is not an allowed function",
            callable.kind()
        )));
    };
    let Value::Tuple(args) = args else {
        return Err(Problem::corrupt(format!(
            "pickle call arguments should be a tuple, found {}",
            args.kind()
        )));
    };
    match global {
        Global::OrderedDict => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            [Value::List(items)] => Ok(Value::Dict(
                items
                    .iter()
                    .map(|item| match item {
                        Value::Tuple(kv) | Value::List(kv) if kv.len() == 2 => {
                            Ok((kv[0].clone(), kv[1].clone()))
                        }
                        _ => Err(Problem::corrupt("OrderedDict items should be pairs")),
                    })
                    .collect::<Result<_, _>>()?,
            )),
            _ => Err(Problem::corrupt(
                "OrderedDict called with unexpected arguments",
            )),
        },
        Global::RebuildTensorV2 => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else {
                return Err(Problem::corrupt(
                    "_rebuild_tensor_v2 called with too few arguments",
                ));
            };
            let Value::Storage(storage) = storage else {
                return Err(Problem::corrupt(format!(
                    "_rebuild_tensor_v2 expects a storage, found {}",
                    storage.kind()
                )));
            };
            let shape = as_usizes(shape, "tensor size")?;
            let stride = as_usizes(stride, "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(Problem::corrupt("tensor size and stride differ in length"));
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: as_usize(offset, "storage offset")?,
                shape,
                stride,
            }))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(tensor @ Value::Tensor(_)) => Ok(tensor.clone()),
            _ => Err(Problem::corrupt("_rebuild_parameter expects a tensor")),
        },
        Global::StorageType(_) => Err(Problem::corrupt(
            "pickle instantiates a storage class directly",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_containers_numbers_and_strings() {
        // pickle.dumps({'a': [1, -2, 300, 70000], 'b': (1.5, None, True), 'c': 'x'}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01J\x70\x11\x01\x00eX\x01\x00\x00\x00bq\x03G?\xf8\x00\x00\x00\x00\x00\x00N\x88\x87q\x04X\x01\x00\x00\x00cq\x05X\x01\x00\x00\x00xq\x06u.";
        let (value, used) = read_pickle(bytes).unwrap();
        assert_eq!(used, bytes.len());
        let Value::Dict(items) = value else { panic!() };
        assert_eq!(
            items[0].1,
            Value::List(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Int(300),
                Value::Int(70000)
            ])
        );
        assert_eq!(
            items[1].1,
            Value::Tuple(vec![Value::Float(1.5), Value::None, Value::Bool(true)])
        );
        assert_eq!(items[2].1, Value::Str("x".into()));
    }

    #[test]
    fn refuses_unknown_globals_before_calling_them() {
        let bytes = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let err = read_pickle(bytes).unwrap_err();
        assert_eq!(err.kind, CheckpointErrorKind::RefusedGlobal);
        assert!(
            err.message
                .contains("refusing the pickled global 'posix.system'"),
            "{err}"
        );
    }

    #[test]
    fn truncated_pickle_is_an_error_not_a_panic() {
        let bytes = b"\x80\x02}q\x00(X\x05\x00\x00\x00ab";
        assert!(
            read_pickle(bytes)
                .unwrap_err()
                .message
                .contains("ends early")
        );
        assert!(read_pickle(b"").is_err());
    }

    #[test]
    fn repeated_recalls_of_a_large_value_are_refused() {
        // A list of 10,000 ints, memoized once filled, then appended to another list 2,000 times.
        let mut bytes = b"\x80\x02](".to_vec();
        for _ in 0..10_000 {
            bytes.extend_from_slice(b"K\x01");
        }
        bytes.extend_from_slice(b"eq\x00]");
        for _ in 0..2_000 {
            bytes.extend_from_slice(b"h\x00a");
        }
        bytes.push(b'.');
        let err = read_pickle(&bytes).unwrap_err();
        assert_eq!(err.kind, CheckpointErrorKind::TooLarge, "{err}");
        assert!(err.message.contains("refusing to expand"), "{err}");
    }

    #[test]
    fn repeated_recalls_of_a_long_string_are_refused() {
        // One 64 KiB string, memoized, then appended to a list `times` more times.
        let recalled = |times: usize| {
            let mut bytes = b"\x80\x02]X\x00\x00\x01\x00".to_vec();
            bytes.extend(std::iter::repeat_n(b's', 65_536));
            bytes.extend_from_slice(b"q\x00a");
            for _ in 0..times {
                bytes.extend_from_slice(b"h\x00a");
            }
            bytes.push(b'.');
            read_pickle(&bytes)
        };
        // 4,000 recalls: 256 MiB of copies from a 76 KB pickle, though only 4,001 values.
        let err = recalled(4_000).unwrap_err();
        assert_eq!(err.kind, CheckpointErrorKind::TooLarge, "{err}");
        // 20 recalls (1.3 MiB, a long config text, say) are read.
        let (value, _) = recalled(20).unwrap();
        assert!(matches!(value, Value::List(items) if items.len() == 21));
    }

    #[test]
    fn memo_entries_are_shared_references() {
        // a = []; pickle.dumps({'x': a, 'y': a}, protocol=2) after a.append(1): the list is
        // memoized while empty, filled, then recalled for 'y'.
        let bytes =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00xq\x01]q\x02K\x01aX\x01\x00\x00\x00yq\x03h\x02u.";
        let (value, _) = read_pickle(bytes).unwrap();
        let one = Value::List(vec![Value::Int(1)]);
        assert_eq!(
            value,
            Value::Dict(vec![
                (Value::Str("x".into()), one.clone()),
                (Value::Str("y".into()), one),
            ])
        );
        // DUP shares too: `[] DUP 1 APPEND POP` leaves the filled list.
        let (value, _) = read_pickle(b"\x80\x02]2K\x01a0.").unwrap();
        assert_eq!(value, Value::List(vec![Value::Int(1)]));
    }

    #[test]
    fn deep_nesting_and_self_reference_are_refused_without_recursing_away() {
        // A million nested lists: refused by depth, not by overflowing the stack.
        let mut bytes = b"\x80\x02".to_vec();
        bytes.extend(std::iter::repeat_n(b']', 1_000_000));
        bytes.extend(std::iter::repeat_n(b'a', 999_999));
        bytes.push(b'.');
        let err = read_pickle(&bytes).unwrap_err();
        assert!(err.message.contains("more than 512 deep"), "{err}");
        // A list appended to itself.
        let err = read_pickle(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(err.message.contains("holds itself"), "{err}");
    }

    #[test]
    fn references_to_references_are_refused_not_expanded() {
        // List i holds list i-1 twice, forty times over: 2^40 values once expanded.
        let mut bytes = b"\x80\x02]q\x00".to_vec();
        for i in 1..=40u8 {
            bytes.extend_from_slice(&[b'(', b'h', i - 1, b'h', i - 1, b'l', b'q', i]);
        }
        bytes.push(b'.');
        let err = read_pickle(&bytes).unwrap_err();
        assert_eq!(err.kind, CheckpointErrorKind::TooLarge, "{err}");
        assert!(err.message.contains("refusing to expand"), "{err}");
    }

    #[test]
    fn long1_handles_the_legacy_magic_number() {
        // pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)
        let bytes = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.";
        let (value, _) = read_pickle(bytes).unwrap();
        assert_eq!(value, Value::Int(0x1950a86a20f9469cfc6c));
    }
}
