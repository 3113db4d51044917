package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"testing"
)

// sumsOf records p in one Write.
func sumsOf(p []byte) *SourceSums {
	s := &SourceSums{}
	s.Write(p)
	return s
}

// TestSourceSums: the checksums depend on the content only, not on how it
// was split into writes and runs of zeros; they are the CRC-32C of each
// MiB; a change anywhere is found in its MiB.
func TestSourceSums(t *testing.T) {
	const mib = SourceSumChunk
	data := make([]byte, 5*mib+12345)
	for i := mib / 2; i < 2*mib+7; i++ {
		data[i] = byte(i*7 + 1)
	}
	for i := 4*mib - 3; i < 4*mib+100; i++ {
		data[i] = byte(i) | 1
	}
	whole := sumsOf(data)
	if whole.Len() != int64(len(data)) || len(whole.sums) != 5 {
		t.Fatalf("Len %d, %d sums", whole.Len(), len(whole.sums))
	}
	for i, c := range whole.sums {
		if want := crc32.Checksum(data[i*mib:(i+1)*mib], castagnoli); c != want {
			t.Errorf("sum %d: %08x, want %08x", i, c, want)
		}
	}

	// The same content in pieces, its zero runs given as WriteZeros.
	pieces := &SourceSums{}
	for off := 0; off < len(data); {
		n := min(len(data)-off, 1+off%(300<<10))
		p := data[off : off+n]
		if bytes.Count(p, []byte{0}) == n {
			pieces.WriteZeros(int64(n))
		} else {
			pieces.Write(p)
		}
		off += n
	}
	// Long runs of zeros, whole chunks and not, through WriteZeros.
	runs := &SourceSums{}
	runs.WriteZeros(mib / 2)
	runs.Write(data[mib/2 : 2*mib+7])
	runs.WriteZeros(4*mib - 3 - (2*mib + 7))
	runs.Write(data[4*mib-3 : 4*mib+100])
	runs.WriteZeros(int64(len(data)) - (4*mib + 100))
	for name, s := range map[string]*SourceSums{"pieces": pieces, "runs": runs} {
		if ok, at := whole.Equal(s); !ok {
			t.Errorf("%s: differ at %d from the same content in one write", name, at)
		}
	}

	// Runs of whole chunks of zeros take the precomputed sum.
	for _, lead := range []int{0, 10} {
		p := make([]byte, lead+3*mib+5)
		for i := range lead {
			p[i] = 1
		}
		z := &SourceSums{}
		z.Write(p[:lead])
		z.WriteZeros(int64(len(p) - lead))
		if ok, at := sumsOf(p).Equal(z); !ok {
			t.Errorf("%d bytes then zeros: differ at %d", lead, at)
		}
	}

	for _, off := range []int{0, mib - 1, mib, 3*mib + 5, len(data) - 1} {
		changed := bytes.Clone(data)
		changed[off] ^= 0x40
		if ok, at := whole.Equal(sumsOf(changed)); ok || at != int64(off/mib*mib) {
			t.Errorf("byte %d changed: equal %v, at %d", off, ok, at)
		}
	}
	if ok, _ := whole.Equal(sumsOf(data[:len(data)-1])); ok {
		t.Error("a shorter content is equal")
	}
	if ok, _ := whole.Equal(sumsOf(append(bytes.Clone(data), make([]byte, mib)...))); ok {
		t.Error("a longer content is equal")
	}
}

// TestWriteStreamExpectSums: a source that reads as it did when its sums
// were taken streams whole (holes and all); a changed one fails with
// ErrSourceChanged naming the MiB, and the sink never gets its head.
func TestWriteStreamExpectSums(t *testing.T) {
	ctx := context.Background()
	src := stSource{size: 3<<20 + 1000, ranges: [][2]int64{{100 << 10, 300 << 10}, {2<<20 + 5, 2<<20 + 70000}}}
	data := src.bytes(3)
	padded := append(bytes.Clone(data), make([]byte, 24)...) // to 512
	sums := sumsOf(padded)

	for _, holes := range []bool{false, true} {
		t.Run(fmt.Sprintf("holes=%v", holes), func(t *testing.T) {
			reader := func(raw []byte) io.Reader {
				if holes {
					return &holeReader{raw: raw, ranges: src.ranges}
				}
				return bytes.NewReader(raw)
			}
			sink := &memSink{t: t}
			st, err := WriteStream(ctx, sink, reader(data), src.size, StreamOptions{ExpectSums: sums})
			if err != nil || sink.headCalls != 1 {
				t.Fatalf("unchanged source: %v (head calls %d)", err, sink.headCalls)
			}
			if st.RawSHA256 != [32]byte{} {
				t.Error("RawSHA256 set although the content was checked by its sums")
			}
			changed := bytes.Clone(data)
			changed[2<<20+6] ^= 1
			sink = &memSink{t: t}
			_, err = WriteStream(ctx, sink, reader(changed), src.size, StreamOptions{ExpectSums: sums})
			if !errors.Is(err, ErrSourceChanged) || !strings.Contains(err.Error(), fmt.Sprint(2<<20)) || sink.headCalls != 0 {
				t.Errorf("changed source: %v (head calls %d)", err, sink.headCalls)
			}
		})
	}
	// Data where the sums saw a hole (and holes are skipped): found too.
	moved := bytes.Clone(data)
	moved[1<<20+3] = 9
	sink := &memSink{t: t}
	_, err := WriteStream(ctx, sink, &holeReader{raw: moved, ranges: [][2]int64{src.ranges[0], {1<<20 + 3, 1<<20 + 4}, src.ranges[1]}}, src.size, StreamOptions{ExpectSums: sums})
	if !errors.Is(err, ErrSourceChanged) || sink.headCalls != 0 {
		t.Errorf("data in a former hole: %v (head calls %d)", err, sink.headCalls)
	}
}
