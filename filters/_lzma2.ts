/**
 * An LZMA2 decoder (the compression inside .xz blocks), written from the
 * published format descriptions. It decodes one whole block into a
 * caller-sized buffer, which doubles as the dictionary: the xz filter
 * needs random access by block, never streaming.
 *
 * @module
 */

/** A corrupt or unsupported compressed stream. */
export class LzmaError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "LzmaError";
  }
}

const NUM_STATES = 12;
const POS_STATES_MAX = 16;
const LEN_LOW = 8;
const LEN_MID = 8;
const LEN_HIGH = 256;
const END_POS_MODEL = 14;
const FULL_DISTANCES = 128;
const ALIGN_BITS = 4;
const PROB_INIT = 1024;

/** Probabilities of one length decoder. */
class LengthModel {
  choice = new Uint16Array(2);
  low = new Uint16Array(POS_STATES_MAX * LEN_LOW);
  mid = new Uint16Array(POS_STATES_MAX * LEN_MID);
  high = new Uint16Array(LEN_HIGH);
  reset(): void {
    this.choice.fill(PROB_INIT);
    this.low.fill(PROB_INIT);
    this.mid.fill(PROB_INIT);
    this.high.fill(PROB_INIT);
  }
}

/** Decodes LZMA2 data into `out` (exactly `out.length` bytes must come out). */
export function decodeLzma2(input: Uint8Array, out: Uint8Array): number {
  return new Lzma2Decoder(input, out).run();
}

class Lzma2Decoder {
  readonly #in: Uint8Array;
  readonly #out: Uint8Array;
  #ip = 0;
  #op = 0;
  #dictStart = 0;
  // Range coder.
  #range = 0;
  #code = 0;
  #limit = 0;
  // LZMA properties and state.
  #lc = 0;
  #lp = 0;
  #pb = 0;
  #state = 0;
  #rep0 = 0;
  #rep1 = 0;
  #rep2 = 0;
  #rep3 = 0;
  #literal = new Uint16Array(0x300 << 4);
  readonly #isMatch = new Uint16Array(NUM_STATES * POS_STATES_MAX);
  readonly #isRep = new Uint16Array(NUM_STATES);
  readonly #isRepG0 = new Uint16Array(NUM_STATES);
  readonly #isRepG1 = new Uint16Array(NUM_STATES);
  readonly #isRepG2 = new Uint16Array(NUM_STATES);
  readonly #isRep0Long = new Uint16Array(NUM_STATES * POS_STATES_MAX);
  readonly #posSlot = new Uint16Array(4 * 64);
  readonly #posSpecial = new Uint16Array(1 + FULL_DISTANCES - END_POS_MODEL);
  readonly #align = new Uint16Array(1 << ALIGN_BITS);
  readonly #len = new LengthModel();
  readonly #repLen = new LengthModel();
  #haveProps = false;

  constructor(input: Uint8Array, out: Uint8Array) {
    this.#in = input;
    this.#out = out;
  }

  run(): number {
    const input = this.#in;
    let needDictReset = true;
    while (true) {
      if (this.#ip >= input.length) throw new LzmaError("truncated LZMA2 stream");
      const control = input[this.#ip++]!;
      if (control === 0x00) return this.#ip;
      if (control === 0x01 || control === 0x02) {
        if (control === 0x01) {
          this.#dictStart = this.#op;
          needDictReset = false;
        } else if (needDictReset) {
          throw new LzmaError("LZMA2 stream does not start with a dictionary reset");
        }
        const size = ((input[this.#ip]! << 8) | input[this.#ip + 1]!) + 1;
        this.#ip += 2;
        if (this.#ip + size > input.length) throw new LzmaError("truncated uncompressed chunk");
        if (this.#op + size > this.#out.length) {
          throw new LzmaError("block larger than its index says");
        }
        this.#out.set(input.subarray(this.#ip, this.#ip + size), this.#op);
        this.#ip += size;
        this.#op += size;
        continue;
      }
      if (control < 0x80) throw new LzmaError(`bad LZMA2 control byte 0x${control.toString(16)}`);
      if (this.#ip + 4 > input.length) throw new LzmaError("truncated LZMA2 chunk header");
      const unpacked = (((control & 0x1f) << 16) | (input[this.#ip]! << 8) | input[this.#ip + 1]!) +
        1;
      const packed = ((input[this.#ip + 2]! << 8) | input[this.#ip + 3]!) + 1;
      this.#ip += 4;
      const reset = (control >> 5) & 3;
      if (reset === 3) {
        this.#dictStart = this.#op;
        needDictReset = false;
      } else if (needDictReset) {
        throw new LzmaError("LZMA2 stream does not start with a dictionary reset");
      }
      if (reset >= 2) {
        this.#setProps(input[this.#ip++]!);
      } else if (!this.#haveProps) throw new LzmaError("LZMA2 chunk without properties");
      if (reset >= 1) this.#resetState();
      if (this.#op + unpacked > this.#out.length) {
        throw new LzmaError("block larger than its index says");
      }
      const end = this.#ip + packed;
      if (end > input.length) throw new LzmaError("truncated LZMA chunk");
      this.#initRange(end);
      this.#decode(this.#op + unpacked);
      this.#ip = end;
    }
  }

  #setProps(byte: number): void {
    if (byte >= 9 * 5 * 5) throw new LzmaError("bad LZMA properties");
    this.#lc = byte % 9;
    const rest = Math.floor(byte / 9);
    this.#lp = rest % 5;
    this.#pb = Math.floor(rest / 5);
    if (this.#lc + this.#lp > 4) throw new LzmaError("LZMA2 requires lc + lp <= 4");
    this.#literal = new Uint16Array(0x300 << (this.#lc + this.#lp));
    this.#haveProps = true;
  }

  #resetState(): void {
    this.#state = 0;
    this.#rep0 =
      this.#rep1 =
      this.#rep2 =
      this.#rep3 =
        0;
    this.#literal.fill(PROB_INIT);
    this.#isMatch.fill(PROB_INIT);
    this.#isRep.fill(PROB_INIT);
    this.#isRepG0.fill(PROB_INIT);
    this.#isRepG1.fill(PROB_INIT);
    this.#isRepG2.fill(PROB_INIT);
    this.#isRep0Long.fill(PROB_INIT);
    this.#posSlot.fill(PROB_INIT);
    this.#posSpecial.fill(PROB_INIT);
    this.#align.fill(PROB_INIT);
    this.#len.reset();
    this.#repLen.reset();
  }

  #initRange(limit: number): void {
    this.#limit = limit;
    if (this.#ip + 5 > limit) throw new LzmaError("LZMA chunk too short");
    if (this.#in[this.#ip] !== 0) throw new LzmaError("bad range coder start");
    this.#code = ((this.#in[this.#ip + 1]! << 24) | (this.#in[this.#ip + 2]! << 16) |
      (this.#in[this.#ip + 3]! << 8) | this.#in[this.#ip + 4]!) >>> 0;
    this.#range = 0xffffffff;
    this.#ip += 5;
  }

  #normalize(): void {
    if (this.#range < 0x1000000) {
      if (this.#ip >= this.#limit) throw new LzmaError("LZMA chunk ends early");
      this.#range = (this.#range << 8) >>> 0;
      this.#code = ((this.#code << 8) | this.#in[this.#ip++]!) >>> 0;
    }
  }

  #bit(probs: Uint16Array, i: number): number {
    const p = probs[i]!;
    const bound = (this.#range >>> 11) * p;
    let bit;
    if (this.#code < bound) {
      this.#range = bound;
      probs[i] = p + ((2048 - p) >>> 5);
      bit = 0;
    } else {
      this.#range -= bound;
      this.#code -= bound;
      probs[i] = p - (p >>> 5);
      bit = 1;
    }
    this.#normalize();
    return bit;
  }

  #direct(count: number): number {
    let result = 0;
    for (let i = 0; i < count; i++) {
      this.#range >>>= 1;
      let bit = 0;
      if (this.#code >= this.#range) {
        this.#code -= this.#range;
        bit = 1;
      }
      result = ((result << 1) | bit) >>> 0;
      this.#normalize();
    }
    return result;
  }

  #tree(probs: Uint16Array, base: number, bits: number): number {
    let m = 1;
    for (let i = 0; i < bits; i++) m = (m << 1) | this.#bit(probs, base + m);
    return m - (1 << bits);
  }

  #reverseTree(probs: Uint16Array, base: number, bits: number): number {
    let m = 1;
    let symbol = 0;
    for (let i = 0; i < bits; i++) {
      const bit = this.#bit(probs, base + m);
      m = (m << 1) | bit;
      symbol |= bit << i;
    }
    return symbol;
  }

  #length(model: LengthModel, posState: number): number {
    if (this.#bit(model.choice, 0) === 0) return this.#tree(model.low, posState * LEN_LOW, 3);
    if (this.#bit(model.choice, 1) === 0) {
      return LEN_LOW + this.#tree(model.mid, posState * LEN_MID, 3);
    }
    return LEN_LOW + LEN_MID + this.#tree(model.high, 0, 8);
  }

  #distance(len: number): number {
    const lenState = len < 3 ? len : 3;
    const slot = this.#tree(this.#posSlot, lenState * 64, 6);
    if (slot < 4) return slot;
    const directBits = (slot >>> 1) - 1;
    let dist = ((2 | (slot & 1)) << directBits) >>> 0;
    if (slot < END_POS_MODEL) {
      dist += this.#reverseTree(this.#posSpecial, dist - slot, directBits);
    } else {
      dist = (dist + ((this.#direct(directBits - ALIGN_BITS) << ALIGN_BITS) >>> 0)) >>> 0;
      dist += this.#reverseTree(this.#align, 0, ALIGN_BITS);
    }
    return dist >>> 0;
  }

  /** Decodes LZMA symbols until the output reaches `end`. */
  #decode(end: number): void {
    const out = this.#out;
    const pbMask = (1 << this.#pb) - 1;
    const lpMask = (1 << this.#lp) - 1;
    const lc = this.#lc;
    while (this.#op < end) {
      const pos = this.#op - this.#dictStart;
      const posState = pos & pbMask;
      const state = this.#state;
      if (this.#bit(this.#isMatch, (state << 4) + posState) === 0) {
        const prev = pos > 0 ? out[this.#op - 1]! : 0;
        const base = 0x300 * (((pos & lpMask) << lc) + (prev >>> (8 - lc)));
        let symbol = 1;
        if (state >= 7) {
          if (this.#rep0 >= pos) throw new LzmaError("match distance beyond the dictionary");
          let matchByte = out[this.#op - this.#rep0 - 1]!;
          while (symbol < 0x100) {
            const matchBit = (matchByte >>> 7) & 1;
            matchByte <<= 1;
            const bit = this.#bit(this.#literal, base + 0x100 + (matchBit << 8) + symbol);
            symbol = (symbol << 1) | bit;
            if (matchBit !== bit) break;
          }
        }
        while (symbol < 0x100) symbol = (symbol << 1) | this.#bit(this.#literal, base + symbol);
        out[this.#op++] = symbol & 0xff;
        this.#state = state < 4 ? 0 : state < 10 ? state - 3 : state - 6;
        continue;
      }
      let len: number;
      if (this.#bit(this.#isRep, state) === 0) {
        this.#rep3 = this.#rep2;
        this.#rep2 = this.#rep1;
        this.#rep1 = this.#rep0;
        len = this.#length(this.#len, posState);
        this.#state = state < 7 ? 7 : 10;
        this.#rep0 = this.#distance(len);
        if (this.#rep0 === 0xffffffff) throw new LzmaError("end marker inside an LZMA2 chunk");
      } else {
        if (pos === 0) throw new LzmaError("repeated match at the start of the dictionary");
        if (this.#bit(this.#isRepG0, state) === 0) {
          if (this.#bit(this.#isRep0Long, (state << 4) + posState) === 0) {
            this.#state = state < 7 ? 9 : 11;
            out[this.#op] = out[this.#op - this.#rep0 - 1]!;
            this.#op++;
            continue;
          }
        } else {
          let dist: number;
          if (this.#bit(this.#isRepG1, state) === 0) {
            dist = this.#rep1;
          } else {
            if (this.#bit(this.#isRepG2, state) === 0) {
              dist = this.#rep2;
            } else {
              dist = this.#rep3;
              this.#rep3 = this.#rep2;
            }
            this.#rep2 = this.#rep1;
          }
          this.#rep1 = this.#rep0;
          this.#rep0 = dist;
        }
        len = this.#length(this.#repLen, posState);
        this.#state = state < 7 ? 8 : 11;
      }
      const dist = this.#rep0 + 1;
      if (dist > pos) throw new LzmaError("match distance beyond the dictionary");
      let n = len + 2;
      if (this.#op + n > end) throw new LzmaError("match runs past the end of the chunk");
      let from = this.#op - dist;
      if (dist >= n) {
        out.copyWithin(this.#op, from, from + n);
        this.#op += n;
      } else {
        // Overlapping copy: byte by byte repeats the pattern.
        while (n-- > 0) out[this.#op++] = out[from++]!;
      }
    }
  }
}
