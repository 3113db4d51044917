package bench

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/snapfs/snapfs/tests/harness"
)

// The limits (parallel GETs of an object with nothing else done) run in a
// process of their own, as every server and client they bound does. Run
// inside the benchmark's process, which also runs the latency proxy, the
// sequential limit was 15% faster than the same GETs from another process
// through the same proxy (10 ms, 16 x 8 MiB GETs of a 1.4 GB object: 1.94-1.96
// s against 2.22-2.34 s), which made every ratio to it look worse.

// limitEnv, when set, makes the test binary run the limit it describes
// (a JSON limitSpec) instead of its tests, and print a limitResult.
const limitEnv = "SNAPFS_BENCH_LIMIT"

// remote is an S3 endpoint and its credentials.
type remote struct{ Endpoint, AccessKey, SecretKey string }

// minioRemote is the endpoint addr of m's MinIO.
func minioRemote(m *harness.MinIO, addr string) remote {
	return remote{Endpoint: addr, AccessKey: m.AccessKey, SecretKey: m.SecretKey}
}

// limitSpec describes one limit run: sequential (Chunk-byte GETs, Jobs in
// flight, over Size bytes) or, with QD set, random 4 KiB GETs at QD for
// Duration.
type limitSpec struct {
	Remote      remote
	Bucket, Key string
	Size, Chunk int64
	Jobs, QD    int
	Duration    time.Duration
}

// limitResult is a limit run's outcome: Seconds for a sequential run,
// IOPS for a random one.
type limitResult struct {
	Seconds, IOPS float64
	Stalled       bool
	Err           string
}

func TestMain(m *testing.M) {
	if s := os.Getenv(limitEnv); s != "" {
		os.Exit(limitProcess(s))
	}
	os.Exit(m.Run())
}

// limitProcess runs the limit s describes and prints its result.
func limitProcess(s string) int {
	var sp limitSpec
	var res limitResult
	if err := json.Unmarshal([]byte(s), &sp); err != nil {
		res.Err = err.Error()
	} else if cl, err := minio.New(sp.Remote.Endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(sp.Remote.AccessKey, sp.Remote.SecretKey, ""),
		Region: harness.MinIORegion, Transport: proxyTransport(),
	}); err != nil {
		res.Err = err.Error()
	} else if sp.QD > 0 {
		o := randomGets(cl, sp.Bucket, sp.Key, sp.Size, sp.QD, sp.Duration)
		res.IOPS, res.Stalled = o.value, o.stalled
		if o.err != nil {
			res.Err = o.err.Error()
		}
	} else if d, err := parallelGets(cl, sp.Bucket, sp.Key, sp.Size, sp.Chunk, sp.Jobs); err != nil {
		res.Err = err.Error()
	} else {
		res.Seconds = d.Seconds()
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// runLimit runs sp in a new process of this test binary.
func runLimit(sp limitSpec) limitResult {
	b, err := json.Marshal(sp)
	if err != nil {
		return limitResult{Err: err.Error()}
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), limitEnv+"="+string(b))
	out, err := cmd.Output()
	var res limitResult
	if err == nil {
		err = json.Unmarshal(out, &res)
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return limitResult{Err: fmt.Sprintf("limit process: %v", err)}
	}
	return res
}

// seqLimit reads the whole object (size bytes) with chunk-byte ranged GETs,
// jobs in flight, in a process of its own, and returns the time it took.
func seqLimit(tb testing.TB, r remote, bucket, key string, size, chunk int64, jobs int) time.Duration {
	tb.Helper()
	res := runLimit(limitSpec{Remote: r, Bucket: bucket, Key: key, Size: size, Chunk: chunk, Jobs: jobs})
	if res.Err != "" {
		tb.Fatal(res.Err)
	}
	return time.Duration(res.Seconds * float64(time.Second))
}

// randLimit issues 4 KiB GETs at random offsets, qd in flight, for dur, in
// a process of its own, and returns the IOPS as an outcome.
func randLimit(r remote, bucket, key string, size int64, qd int, dur time.Duration) outcome {
	res := runLimit(limitSpec{Remote: r, Bucket: bucket, Key: key, Size: size, QD: qd, Duration: dur})
	o := outcome{value: res.IOPS, stalled: res.Stalled}
	if res.Err != "" {
		o.err = errors.New(res.Err)
	}
	return o
}
