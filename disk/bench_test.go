package disk

// Benchmarks over a real MinIO on loopback, to choose DefaultMinFetch:
//
//	go test ./disk -run '^$' -bench . -benchtime 200x -timeout 30m
//
// "minio" reads MinIO as it is; "s3model" adds, per GET, a 20 ms first
// byte delay and a 100 MB/s transfer rate (a model of one S3 connection)
// in a Store wrapper.

import (
	"context"
	"fmt"
	"math/rand"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/internal/bufpool"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
	"github.com/snapfs/snapfs/tests/harness"
)

const (
	benchSize   = 256 * mib
	benchRegion = 4 * mib // cold reads land in distinct regions of this size
)

var benchMinFetch = []int64{64 << 10, 256 << 10, 1 * mib, 4 * mib}

// modelStore delays each ReadAt by first plus len(p)/rate.
type modelStore struct {
	objstore.Store
	first time.Duration
	rate  float64 // bytes per second
}

func (s *modelStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts objstore.ReadOptions) (int, error) {
	d := s.first + time.Duration(float64(len(p))/s.rate*float64(time.Second))
	select {
	case <-time.After(d):
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return s.Store.ReadAt(ctx, key, p, off, opts)
}

type benchEnv struct {
	stores map[string]objstore.Store // by model name
	m      *objstore.Metrics
	key    string
}

var benchModels = []string{"minio", "s3model"}

// startBench uploads a 256 MiB QCOW2 image of random data to a fresh MinIO
// and returns stores over it, stacked like the CLI's.
func startBench(b *testing.B) *benchEnv {
	b.Helper()
	needQemu(b)
	dir := b.TempDir()
	raw := filepath.Join(dir, "src.raw")
	randomRaw(b, raw, benchSize, 1, [2]int64{0, benchSize})
	img := filepath.Join(dir, "disk.qcow2")
	run(b, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	srv := harness.StartMinIO(b)
	srv.MakeBucket(b, "bench")
	srv.Upload(b, "bench", "disk.qcow2", img)
	st, key, err := objstore.Open(context.Background(), "s3://bench/disk.qcow2", srv.Config())
	if err != nil {
		b.Fatal(err)
	}
	m := new(objstore.Metrics)
	stack := func(s objstore.Store) objstore.Store {
		return objstore.WithPinning(objstore.WithRetry(objstore.WithMetrics(s, m), objstore.RetryPolicy{}))
	}
	return &benchEnv{
		stores: map[string]objstore.Store{
			"minio":   stack(st),
			"s3model": stack(&modelStore{Store: st, first: 20 * time.Millisecond, rate: 100e6}),
		},
		m:   m,
		key: key,
	}
}

// open returns a fresh Disk (own 512 MiB cache) with its metadata loaded.
func (e *benchEnv) open(b *testing.B, model string, minFetch int64) (*Disk, func()) {
	b.Helper()
	ctx := context.Background()
	im, err := qcow2.Open(ctx, e.stores[model], e.key, nil)
	if err != nil {
		b.Fatal(err)
	}
	c, err := cache.NewMemory(512 * mib)
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(im, Options{Cache: c, MinFetch: minFetch})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.Extents(ctx, 0, d.Size()); err != nil {
		b.Fatal(err)
	}
	return d, func() { d.Close(); im.Close(); c.Close() }
}

func kib(n int64) string {
	if n >= mib {
		return fmt.Sprintf("%dM", n/mib)
	}
	return fmt.Sprintf("%dK", n>>10)
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / 1e6 }
	b.ReportMetric(ms(0.5), "p50-ms")
	b.ReportMetric(ms(0.99), "p99-ms")
}

// BenchmarkRandomRead measures cold random 4 KiB reads: each lands in a
// 4 MiB region no earlier read of the same Disk touched, so each is a
// miss whatever MinFetch is. "1" is one reader; "16" are 16 readers at
// once (ns/op is then per read, at 16 in flight).
func BenchmarkRandomRead(b *testing.B) {
	e := startBench(b)
	for _, model := range benchModels {
		for _, mf := range benchMinFetch {
			for _, readers := range []int{1, 16} {
				b.Run(fmt.Sprintf("%s/minfetch=%s/readers=%d", model, kib(mf), readers), func(b *testing.B) {
					benchRandom(b, e, model, mf, readers)
				})
			}
		}
	}
}

func benchRandom(b *testing.B, e *benchEnv, model string, mf int64, readers int) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(1))
	regions := benchSize / benchRegion
	var (
		mu         sync.Mutex
		lat        []time.Duration
		fetches    int64
		fetchBytes int64
	)
	b.ResetTimer()
	for done := 0; done < b.N; {
		b.StopTimer()
		d, closeDisk := e.open(b, model, mf)
		perm := rng.Perm(int(regions))
		n := min(len(perm), b.N-done)
		offs := make([]int64, n)
		for i := range offs {
			offs[i] = int64(perm[i])*benchRegion + rng.Int63n(benchRegion/4096)*4096
		}
		var next atomic.Int64
		b.StartTimer()
		var eg errgroup.Group
		for range readers {
			eg.Go(func() error {
				p := make([]byte, 4096)
				for {
					i := next.Add(1) - 1
					if i >= int64(n) {
						return nil
					}
					t0 := time.Now()
					if _, err := d.ReadAt(ctx, p, offs[i]); err != nil {
						return err
					}
					el := time.Since(t0)
					mu.Lock()
					lat = append(lat, el)
					mu.Unlock()
				}
			})
		}
		if err := eg.Wait(); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		s := d.Stats()
		fetches += s.Fetches
		fetchBytes += s.BytesFetched
		closeDisk()
		done += n
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(float64(fetches)/float64(b.N), "GETs/op")
	b.ReportMetric(float64(fetchBytes)/float64(b.N)/1024, "KiB-fetched/op")
	reportLatency(b, lat)
}

// BenchmarkSequential reads the whole disk in order (a fresh Disk per
// iteration) with 4 KiB and 128 KiB requests; "limit" reads the object
// with 16 parallel 8 MiB GETs and no Disk, the GET limit to compare with.
// cpu-ms/op is this process's CPU time (MinIO runs in another).
func BenchmarkSequential(b *testing.B) {
	e := startBench(b)
	for _, model := range benchModels {
		b.Run(model+"/limit", func(b *testing.B) {
			b.SetBytes(benchSize)
			st := e.stores[model]
			c0 := cpuTime()
			defer func() { b.ReportMetric(float64((cpuTime()-c0).Milliseconds())/float64(b.N), "cpu-ms/op") }()
			for range b.N {
				var eg errgroup.Group
				eg.SetLimit(16)
				for off := int64(0); off < benchSize; off += 8 * mib {
					eg.Go(func() error {
						p := bufpool.Get(8 * mib)
						defer bufpool.Put(p)
						_, err := st.ReadAt(context.Background(), e.key, *p, off, objstore.ReadOptions{})
						return err
					})
				}
				if err := eg.Wait(); err != nil {
					b.Fatal(err)
				}
			}
		})
		for _, mf := range benchMinFetch {
			for _, req := range []int{4096, 128 << 10} {
				b.Run(fmt.Sprintf("%s/minfetch=%s/req=%s", model, kib(mf), kib(int64(req))), func(b *testing.B) {
					b.SetBytes(benchSize)
					ctx := context.Background()
					p := make([]byte, req)
					var fetches int64
					var cpu time.Duration
					b.ResetTimer()
					for range b.N {
						b.StopTimer()
						d, closeDisk := e.open(b, model, mf)
						c0 := cpuTime()
						b.StartTimer()
						for off := int64(0); off < d.Size(); off += int64(req) {
							if _, err := d.ReadAt(ctx, p, off); err != nil {
								b.Fatal(err)
							}
						}
						b.StopTimer()
						cpu += cpuTime() - c0
						fetches += d.Stats().Fetches
						closeDisk()
						b.StartTimer()
					}
					b.StopTimer()
					b.ReportMetric(float64(fetches)/float64(b.N), "GETs/op")
					b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/op")
				})
			}
		}
	}
}
