/* The hot half of keys.chain_hashes in C (ARCHITECTURE §3): packing a prompt's token
 * ids to little-endian int32, and the prefix chain over its chunks:
 *   d_i = BLAKE2b-256(chunk_i)            (unkeyed, independent per chunk)
 *   h_i = BLAKE2b-128_key(h_{i-1} || d_i)
 *
 * In Python these cost ~0.5 ms (struct.pack of 32k ints) and ~0.3 ms (128 hashlib
 * objects) per LOOKUP of a 32k-token prompt, three to five times the sidecar's whole
 * reply. The d_i do not depend on each other, so eight of them are computed at once
 * with AVX-512F, four with AVX2, one chunk per 64-bit lane; the chain step is then one
 * compression (the keyed state after the key block is computed once). Both functions
 * return exactly what the pure-Python path in keys.py returns; tests/test_keys.py checks
 * that on random inputs, with the lanes and without. BLAKE2b is written out from RFC 7693 (no library
 * dependency: the extension must build wherever Python headers and a C compiler exist,
 * and keys.py falls back to Python where it does not).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_LANES 1
#endif

/* ---- BLAKE2b (RFC 7693), keyed, any digest length up to 64 ---------------------- */

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

typedef struct {
    uint64_t h[8];
    uint64_t t;          /* bytes compressed so far (messages here are far below 2^64) */
    uint8_t buf[128];
    size_t fill;         /* bytes in buf */
    size_t outlen;
} blake2b_state;

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) | ((uint64_t)p[3] << 24) |
           ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define G(a, b, c, d, x, y)              \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = rotr64(v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = rotr64(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 63);  \
    } while (0)

static void compress(blake2b_state *s, const uint8_t block[128], int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->t;  /* the high word of the counter stays 0 */
    if (last) v[14] = ~v[14];
    /* Rounds unrolled with constant indices: the compiler folds SIGMA away (a loop over r
     * kept it as loads and ran at half the speed). */
#define ROUND(r)                                              \
    do {                                                      \
        G(0, 4, 8, 12, m[SIGMA[r][0]], m[SIGMA[r][1]]);       \
        G(1, 5, 9, 13, m[SIGMA[r][2]], m[SIGMA[r][3]]);       \
        G(2, 6, 10, 14, m[SIGMA[r][4]], m[SIGMA[r][5]]);      \
        G(3, 7, 11, 15, m[SIGMA[r][6]], m[SIGMA[r][7]]);      \
        G(0, 5, 10, 15, m[SIGMA[r][8]], m[SIGMA[r][9]]);      \
        G(1, 6, 11, 12, m[SIGMA[r][10]], m[SIGMA[r][11]]);    \
        G(2, 7, 8, 13, m[SIGMA[r][12]], m[SIGMA[r][13]]);     \
        G(3, 4, 9, 14, m[SIGMA[r][14]], m[SIGMA[r][15]]);     \
    } while (0)
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

/* The buffer always keeps the last (possibly full) block back: BLAKE2b flags the final
 * block, so a block is compressed only once more input is known to follow it. */
static void b2_update(blake2b_state *s, const uint8_t *in, size_t len) {
    while (len > 0) {
        if (s->fill == 128) {
            s->t += 128;
            compress(s, s->buf, 0);
            s->fill = 0;
        }
        size_t take = 128 - s->fill;
        if (take > len) take = len;
        memcpy(s->buf + s->fill, in, take);
        s->fill += take;
        in += take;
        len -= take;
    }
}

static void b2_init(blake2b_state *s, const uint8_t *key, size_t keylen, size_t outlen) {
    for (int i = 0; i < 8; i++) s->h[i] = IV[i];
    s->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    s->t = 0;
    s->fill = 0;
    s->outlen = outlen;
    if (keylen) {
        uint8_t block[128] = {0};
        memcpy(block, key, keylen);
        b2_update(s, block, 128);
    }
}

static void b2_final(blake2b_state *s, uint8_t *out) {
    s->t += s->fill;
    memset(s->buf + s->fill, 0, 128 - s->fill);
    compress(s, s->buf, 1);
    uint8_t full[64];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) full[8 * i + j] = (uint8_t)(s->h[i] >> (8 * j));
    memcpy(out, full, s->outlen);
}

/* The keyed state after the key block: every chain step starts from a copy of it, so a
 * step compresses only its own block (the key block is never the last: input follows). */
static void b2_keyed(blake2b_state *s, const uint8_t *key, size_t keylen, size_t outlen) {
    b2_init(s, key, keylen, outlen);
    if (s->fill == 128) {
        s->t += 128;
        compress(s, s->buf, 0);
        s->fill = 0;
    }
}

/* BLAKE2b-256 of one message, unkeyed. */
static void digest1(const uint8_t *msg, size_t len, uint8_t out[32]) {
    blake2b_state s;
    b2_init(&s, NULL, 0, 32);
    b2_update(&s, msg, len);
    b2_final(&s, out);
}

#ifdef HAVE_LANES
/* Block ``off`` of each of ``lanes`` messages of ``len`` bytes: 128 readable bytes per lane
 * (a short last block copied into ``pad``, zero-filled, as b2_final does). */
static inline void lane_blocks(const uint8_t *const msg[], int lanes, size_t len, size_t off,
                               uint8_t pad[][128], const uint8_t *p[]) {
    size_t take = len - off < 128 ? len - off : 128;
    for (int k = 0; k < lanes; k++) {
        p[k] = msg[k] + off;
        if (take < 128) {
            memset(pad[k], 0, 128);
            memcpy(pad[k], p[k], take);
            p[k] = pad[k];
        }
    }
}

/* Word ``i`` of every lane's state (``w[k]`` is lane k's) into the 32-byte digests. */
static inline void lane_words_out(const uint64_t *w, int lanes, int i, uint8_t out[][32]) {
    for (int k = 0; k < lanes; k++)
        for (int j = 0; j < 8; j++) out[k][8 * i + j] = (uint8_t)(w[k] >> (8 * j));
}

/* digest1 of four messages of one length at once: lane k of each vector is message k. */
#define ROTR32(x) _mm256_shuffle_epi32((x), _MM_SHUFFLE(2, 3, 0, 1))
#define ROTR24(x) _mm256_shuffle_epi8((x), r24)
#define ROTR16(x) _mm256_shuffle_epi8((x), r16)
#define ROTR63(x) _mm256_or_si256(_mm256_srli_epi64((x), 63), _mm256_add_epi64((x), (x)))
#define G4(a, b, c, d, x, y)                                                   \
    do {                                                                       \
        v[a] = _mm256_add_epi64(_mm256_add_epi64(v[a], v[b]), (x));            \
        v[d] = ROTR32(_mm256_xor_si256(v[d], v[a]));                           \
        v[c] = _mm256_add_epi64(v[c], v[d]);                                   \
        v[b] = ROTR24(_mm256_xor_si256(v[b], v[c]));                           \
        v[a] = _mm256_add_epi64(_mm256_add_epi64(v[a], v[b]), (y));            \
        v[d] = ROTR16(_mm256_xor_si256(v[d], v[a]));                           \
        v[c] = _mm256_add_epi64(v[c], v[d]);                                   \
        v[b] = ROTR63(_mm256_xor_si256(v[b], v[c]));                           \
    } while (0)

__attribute__((target("avx2"))) static void digest4(const uint8_t *const msg[], size_t len, uint8_t out[][32]) {
    const __m256i r24 = _mm256_setr_epi8(3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10,
                                         3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10);
    const __m256i r16 = _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9,
                                         2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9);
    __m256i h[8], v[16], m[16];
    for (int i = 0; i < 8; i++) h[i] = _mm256_set1_epi64x((long long)IV[i]);
    h[0] = _mm256_xor_si256(h[0], _mm256_set1_epi64x(0x01010000LL ^ 32));
    size_t blocks = len ? (len + 127) / 128 : 1;
    uint8_t pad[4][128];
    for (size_t b = 0; b < blocks; b++) {
        size_t off = b * 128, take = len - off < 128 ? len - off : 128;
        int last = b + 1 == blocks;
        const uint8_t *p[4];
        lane_blocks(msg, 4, len, off, pad, p);
        for (int j = 0; j < 16; j++)
            m[j] = _mm256_set_epi64x((long long)load64(p[3] + 8 * j), (long long)load64(p[2] + 8 * j),
                                     (long long)load64(p[1] + 8 * j), (long long)load64(p[0] + 8 * j));
        for (int i = 0; i < 8; i++) {
            v[i] = h[i];
            v[i + 8] = _mm256_set1_epi64x((long long)IV[i]);
        }
        v[12] = _mm256_xor_si256(v[12], _mm256_set1_epi64x((long long)(off + take)));
        if (last) v[14] = _mm256_xor_si256(v[14], _mm256_set1_epi64x(-1LL));
#define ROUND4(r)                                              \
    do {                                                       \
        G4(0, 4, 8, 12, m[SIGMA[r][0]], m[SIGMA[r][1]]);       \
        G4(1, 5, 9, 13, m[SIGMA[r][2]], m[SIGMA[r][3]]);       \
        G4(2, 6, 10, 14, m[SIGMA[r][4]], m[SIGMA[r][5]]);      \
        G4(3, 7, 11, 15, m[SIGMA[r][6]], m[SIGMA[r][7]]);      \
        G4(0, 5, 10, 15, m[SIGMA[r][8]], m[SIGMA[r][9]]);      \
        G4(1, 6, 11, 12, m[SIGMA[r][10]], m[SIGMA[r][11]]);    \
        G4(2, 7, 8, 13, m[SIGMA[r][12]], m[SIGMA[r][13]]);     \
        G4(3, 4, 9, 14, m[SIGMA[r][14]], m[SIGMA[r][15]]);     \
    } while (0)
        ROUND4(0); ROUND4(1); ROUND4(2); ROUND4(3); ROUND4(4); ROUND4(5);
        ROUND4(6); ROUND4(7); ROUND4(8); ROUND4(9); ROUND4(10); ROUND4(11);
#undef ROUND4
        for (int i = 0; i < 8; i++) h[i] = _mm256_xor_si256(h[i], _mm256_xor_si256(v[i], v[i + 8]));
    }
    for (int i = 0; i < 4; i++) {  /* words 0..3 are the 32-byte digest, little-endian */
        uint64_t w[4];
        _mm256_storeu_si256((__m256i *)w, h[i]);
        lane_words_out(w, 4, i, out);
    }
}

/* digest1 of eight messages at once (AVX-512F: eight 64-bit lanes, native rotates). */
#define G8(a, b, c, d, x, y)                                                   \
    do {                                                                       \
        v[a] = _mm512_add_epi64(_mm512_add_epi64(v[a], v[b]), (x));            \
        v[d] = _mm512_ror_epi64(_mm512_xor_si512(v[d], v[a]), 32);             \
        v[c] = _mm512_add_epi64(v[c], v[d]);                                   \
        v[b] = _mm512_ror_epi64(_mm512_xor_si512(v[b], v[c]), 24);             \
        v[a] = _mm512_add_epi64(_mm512_add_epi64(v[a], v[b]), (y));            \
        v[d] = _mm512_ror_epi64(_mm512_xor_si512(v[d], v[a]), 16);             \
        v[c] = _mm512_add_epi64(v[c], v[d]);                                   \
        v[b] = _mm512_ror_epi64(_mm512_xor_si512(v[b], v[c]), 63);             \
    } while (0)

__attribute__((target("avx512f"))) static void digest8(const uint8_t *const msg[], size_t len, uint8_t out[][32]) {
    __m512i h[8], v[16], m[16];
    for (int i = 0; i < 8; i++) h[i] = _mm512_set1_epi64((long long)IV[i]);
    h[0] = _mm512_xor_si512(h[0], _mm512_set1_epi64(0x01010000LL ^ 32));
    size_t blocks = len ? (len + 127) / 128 : 1;
    uint8_t pad[8][128];
    for (size_t b = 0; b < blocks; b++) {
        size_t off = b * 128, take = len - off < 128 ? len - off : 128;
        int last = b + 1 == blocks;
        const uint8_t *p[8];
        lane_blocks(msg, 8, len, off, pad, p);
        for (int j = 0; j < 16; j++)
            m[j] = _mm512_set_epi64((long long)load64(p[7] + 8 * j), (long long)load64(p[6] + 8 * j),
                                    (long long)load64(p[5] + 8 * j), (long long)load64(p[4] + 8 * j),
                                    (long long)load64(p[3] + 8 * j), (long long)load64(p[2] + 8 * j),
                                    (long long)load64(p[1] + 8 * j), (long long)load64(p[0] + 8 * j));
        for (int i = 0; i < 8; i++) {
            v[i] = h[i];
            v[i + 8] = _mm512_set1_epi64((long long)IV[i]);
        }
        v[12] = _mm512_xor_si512(v[12], _mm512_set1_epi64((long long)(off + take)));
        if (last) v[14] = _mm512_xor_si512(v[14], _mm512_set1_epi64(-1LL));
#define ROUND8(r)                                              \
    do {                                                       \
        G8(0, 4, 8, 12, m[SIGMA[r][0]], m[SIGMA[r][1]]);       \
        G8(1, 5, 9, 13, m[SIGMA[r][2]], m[SIGMA[r][3]]);       \
        G8(2, 6, 10, 14, m[SIGMA[r][4]], m[SIGMA[r][5]]);      \
        G8(3, 7, 11, 15, m[SIGMA[r][6]], m[SIGMA[r][7]]);      \
        G8(0, 5, 10, 15, m[SIGMA[r][8]], m[SIGMA[r][9]]);      \
        G8(1, 6, 11, 12, m[SIGMA[r][10]], m[SIGMA[r][11]]);    \
        G8(2, 7, 8, 13, m[SIGMA[r][12]], m[SIGMA[r][13]]);     \
        G8(3, 4, 9, 14, m[SIGMA[r][14]], m[SIGMA[r][15]]);     \
    } while (0)
        ROUND8(0); ROUND8(1); ROUND8(2); ROUND8(3); ROUND8(4); ROUND8(5);
        ROUND8(6); ROUND8(7); ROUND8(8); ROUND8(9); ROUND8(10); ROUND8(11);
#undef ROUND8
        for (int i = 0; i < 8; i++) h[i] = _mm512_xor_si512(h[i], _mm512_xor_si512(v[i], v[i + 8]));
    }
    for (int i = 0; i < 4; i++) {
        uint64_t w[8];
        _mm512_storeu_si512((void *)w, h[i]);
        lane_words_out(w, 8, i, out);
    }
}
#endif

/* Lanes this CPU digests at once: 8 (AVX-512F), 4 (AVX2) or 1; set at import. */
static int lanes_available = 1;

/* ---- pack_tokens(seq) -> bytes ------------------------------------------------------- */

/* A token id that fits in one internal digit (< 2^30: every vocabulary) is read without
 * the general conversion; the public API for that exists from 3.12, 3.11's is the struct. */
static inline int small_int(PyObject *item, long *v) {
    if (!PyLong_CheckExact(item)) return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)item)) return 0;
    *v = (long)PyUnstable_Long_CompactValue((PyLongObject *)item);
    return 1;
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size < -1 || size > 1) return 0;
    *v = size * (long)((PyLongObject *)item)->ob_digit[0];
    return 1;
#endif
}

static int token_at(PyObject *item, int32_t *out) {
    int overflow = 0;
    long v;
    if (small_int(item, &v)) {
        /* one digit is below 2^30: always an int32 */
    } else if (PyLong_Check(item)) {
        v = PyLong_AsLongAndOverflow(item, &overflow);
    } else {
        /* What struct.pack accepts: numpy ints too. __index__ runs Python code, which may
         * change the list: the caller holds a reference to the item and re-reads the size. */
        PyObject *idx = PyNumber_Index(item);
        if (idx == NULL) return -1;
        v = PyLong_AsLongAndOverflow(idx, &overflow);
        Py_DECREF(idx);
    }
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < INT32_MIN || v > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "token id does not fit in int32");
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

static PyObject *pack_tokens(PyObject *self, PyObject *seq_arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(seq_arg, "tokens must be a list or tuple of token ids");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    Py_ssize_t i = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    /* The common case in a tight loop: exact ints of at most one digit (every vocabulary's
     * ids; one digit is below 2^30, so always an int32). No call, no error branch per item,
     * so the loads of several items overlap; the first other item hands over to the
     * general loop below. */
    for (; i < n; i++) {
        long v;
        if (!small_int(items[i], &v)) break;
        uint32_t u = (uint32_t)(int32_t)v;
        p[4 * i] = (uint8_t)u;
        p[4 * i + 1] = (uint8_t)(u >> 8);
        p[4 * i + 2] = (uint8_t)(u >> 16);
        p[4 * i + 3] = (uint8_t)(u >> 24);
    }
    for (; i < n; i++) {
        int32_t v;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        int bad;
        if (PyLong_Check(item)) {  /* no Python code runs: the list cannot change under us */
            bad = token_at(item, &v) < 0;
        } else {  /* __index__ may change the list: hold the item, then re-check the size */
            Py_INCREF(item);
            bad = token_at(item, &v) < 0;
            Py_DECREF(item);
            if (!bad && PySequence_Fast_GET_SIZE(seq) != n) {
                PyErr_SetString(PyExc_ValueError, "the token list changed while it was being packed");
                bad = 1;
            }
        }
        if (bad) {
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        uint32_t u = (uint32_t)v;
        p[4 * i] = (uint8_t)u;
        p[4 * i + 1] = (uint8_t)(u >> 8);
        p[4 * i + 2] = (uint8_t)(u >> 16);
        p[4 * i + 3] = (uint8_t)(u >> 24);
    }
    Py_DECREF(seq);
    return out;
}

/* ---- chain(raw, step, n, key, first, digest_size) -> bytes ----------------------------- */

static PyObject *chain(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer raw, key, first;
    Py_ssize_t step, n, outlen;
    int lanes = 8;
    if (!PyArg_ParseTuple(args, "y*nny*y*n|i", &raw, &step, &n, &key, &first, &outlen, &lanes)) return NULL;
    PyObject *out = NULL;
    if (step <= 0 || n < 0 || n > raw.len / step) {
        PyErr_SetString(PyExc_ValueError, "chain: n chunks of step bytes do not fit in raw");
    } else if (key.len > 64 || outlen < 1 || outlen > 64 || first.len != outlen) {
        PyErr_SetString(PyExc_ValueError, "chain: key over 64 bytes, or digest size out of 1..64, "
                                          "or first hash of another size");
    } else if ((out = PyBytes_FromStringAndSize(NULL, n * outlen)) != NULL) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *prev = (const uint8_t *)first.buf;
        const uint8_t *src = (const uint8_t *)raw.buf;
        Py_BEGIN_ALLOW_THREADS
        blake2b_state keyed;
        b2_keyed(&keyed, (const uint8_t *)key.buf, (size_t)key.len, (size_t)outlen);
        uint8_t d[8][32];
        int width = lanes < lanes_available ? lanes : lanes_available;
        for (Py_ssize_t i = 0; i < n;) {
            Py_ssize_t group = 1;
            const uint8_t *msgs[8];
            for (int k = 0; k < 8; k++) msgs[k] = src + (i + (k < n - i ? k : 0)) * step;
#ifdef HAVE_LANES
            if (width >= 8 && n - i >= 8) {
                digest8(msgs, (size_t)step, d);
                group = 8;
            } else if (width >= 4 && n - i >= 4) {
                digest4(msgs, (size_t)step, d);
                group = 4;
            } else
#endif
            {
                digest1(msgs[0], (size_t)step, d[0]);
            }
            for (Py_ssize_t k = 0; k < group; k++) {
                blake2b_state s = keyed;
                b2_update(&s, prev, (size_t)outlen);
                b2_update(&s, d[k], 32);
                b2_final(&s, dst + (i + k) * outlen);
                prev = dst + (i + k) * outlen;
            }
            i += group;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&raw);
    PyBuffer_Release(&key);
    PyBuffer_Release(&first);
    return out;
}

static PyObject *lanes_fn(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(lanes_available);
}

static PyMethodDef methods[] = {
    {"pack_tokens", pack_tokens, METH_O,
     "pack_tokens(seq) -> bytes: token ids as little-endian int32 (OverflowError past int32, "
     "TypeError for a non-integer)."},
    {"chain", chain, METH_VARARGS,
     "chain(raw, step, n, key, first, digest_size, lanes=8) -> bytes: h_i = BLAKE2b(key, digest_size)"
     "(h_{i-1} || BLAKE2b-256(raw[i*step:(i+1)*step])) for i < n, h_{-1} = first; the n digests "
     "concatenated. lanes caps the chunk digests computed at once (1, 4 or 8; the same bytes)."},
    {"lanes", lanes_fn, METH_NOARGS, "lanes() -> int: chunk digests this CPU computes at once (8 AVX-512F, 4 AVX2, else 1)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lmkv_mp.wire._chain",
    "Token packing and the keyed BLAKE2b prefix chain of keys.chain_hashes, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__chain(void) {
#ifdef HAVE_LANES
    __builtin_cpu_init();
    lanes_available = __builtin_cpu_supports("avx512f") ? 8 : __builtin_cpu_supports("avx2") ? 4 : 1;
#endif
    return PyModule_Create(&module);
}
