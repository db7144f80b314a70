//! The record codec in which ranks exchange per-request results.
//!
//! A message is a run of records, each its request index (u64) then its payload; every number is
//! little-endian and floats travel as their bits, so a decoded result is the computed one bit for bit
//! (every rank then computes the metrics from the same values as one rank would).

use crate::RequestResult;

/// A per-request result as it travels between ranks.
pub(crate) trait Record: Sized {
    /// Appends the payload to `out`.
    fn write(&self, out: &mut Vec<u8>);
    /// Reads one payload; `None` when the bytes run out first.
    fn read(input: &mut Reader<'_>) -> Option<Self>;
}

/// Bytes being decoded, consumed from the front.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take()?))
    }
}

/// Scored requests: log-likelihood bits, greedy flag (one byte), continuation tokens.
impl Record for RequestResult {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend(self.loglik.to_bits().to_le_bytes());
        out.push(u8::from(self.is_greedy));
        out.extend(self.n_tokens.to_le_bytes());
    }

    fn read(input: &mut Reader<'_>) -> Option<Self> {
        let loglik = f64::from_bits(input.u64()?);
        let is_greedy = input.u8()? != 0;
        Some(Self { loglik, is_greedy, n_tokens: input.u64()? as i64 })
    }
}

/// Generated tokens: their count (u64), then each token (u32).
impl Record for Vec<u32> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend((self.len() as u64).to_le_bytes());
        for &t in self {
            out.extend(t.to_le_bytes());
        }
    }

    fn read(input: &mut Reader<'_>) -> Option<Self> {
        let len = usize::try_from(input.u64()?).ok()?;
        // A count larger than the bytes left is malformed; checked before allocating for it.
        if len > input.bytes.len() / 4 {
            return None;
        }
        (0..len).map(|_| input.u32()).collect()
    }
}

/// The message for `records`: `(request index, result)` pairs, in the order given.
pub(crate) fn encode<'a, R: Record + 'a>(records: impl IntoIterator<Item = (usize, &'a R)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (request, record) in records {
        out.extend((request as u64).to_le_bytes());
        record.write(&mut out);
    }
    out
}

/// The records of a message, in order; `None` when it does not end at a record's end.
pub(crate) fn decode<R: Record>(bytes: &[u8]) -> Option<Vec<(usize, R)>> {
    let mut input = Reader { bytes };
    let mut records = Vec::new();
    while !input.bytes.is_empty() {
        let request = usize::try_from(input.u64()?).ok()?;
        records.push((request, R::read(&mut input)?));
    }
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(loglik: f64, is_greedy: bool, n_tokens: i64) -> RequestResult {
        RequestResult { loglik, is_greedy, n_tokens }
    }

    #[test]
    fn scores_come_back_bit_for_bit() {
        let nan = f64::from_bits(0x7ff8_0000_dead_beef);
        let records = [
            (3, result(-1.25, true, 4)),
            (0, result(-0.0, false, 1)),
            (7, result(f64::MIN_POSITIVE / 8.0, true, i64::MAX)),
            (1, result(nan, false, 0)),
            (2, result(f64::NEG_INFINITY, true, -1)),
        ];
        let bytes = encode(records.iter().map(|(r, x)| (*r, x)));
        assert_eq!(bytes.len(), records.len() * (8 + 8 + 1 + 8));
        let decoded: Vec<(usize, RequestResult)> = decode(&bytes).expect("well formed");
        assert_eq!(decoded.len(), records.len());
        for ((r, x), (s, y)) in records.iter().zip(&decoded) {
            assert_eq!(
                (r, x.loglik.to_bits(), x.is_greedy, x.n_tokens),
                (s, y.loglik.to_bits(), y.is_greedy, y.n_tokens)
            );
        }
    }

    #[test]
    fn tokens_come_back_whole() {
        let records: Vec<(usize, Vec<u32>)> = vec![(5, vec![1, u32::MAX, 0]), (0, Vec::new()), (2, vec![42])];
        let bytes = encode(records.iter().map(|(r, t)| (*r, t)));
        assert_eq!(decode::<Vec<u32>>(&bytes), Some(records));
        assert_eq!(decode::<Vec<u32>>(&[]), Some(Vec::new()));
    }

    #[test]
    fn a_message_cut_short_or_padded_is_malformed() {
        let scores = encode([(1, &result(-2.0, true, 3)), (4, &result(-0.5, false, 2))]);
        let tokens = encode([(1, &vec![7u32, 8]), (2, &vec![9u32])]);
        // Cut at a record's end, a message is a shorter well-formed one.
        for cut in (1..scores.len()).filter(|&cut| cut != 25) {
            assert!(decode::<RequestResult>(&scores[..cut]).is_none(), "cut at {cut}");
        }
        for cut in (1..tokens.len()).filter(|&cut| cut != 8 + 8 + 2 * 4) {
            assert!(decode::<Vec<u32>>(&tokens[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(decode::<Vec<u32>>(&tokens[..24]), Some(vec![(1, vec![7, 8])]));
        assert!(decode::<Vec<u32>>(&[tokens.as_slice(), &[0]].concat()).is_none());
        // A token count beyond the message is refused, not allocated for.
        let huge = [0u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat();
        assert!(decode::<Vec<u32>>(&huge).is_none());
    }
}
