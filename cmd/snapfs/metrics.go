package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/snapfs/snapfs/cache"
)

// metricsRegistry exposes the counters of a set of devices in Prometheus
// form. client_golang does the text format, content negotiation and
// process metrics, which we would otherwise write by hand.
func metricsRegistry(d *devices) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	counter := func(name, help string, f func() int64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "snapfs_" + name, Help: help}, func() float64 { return float64(f()) }))
	}
	gauge := func(name, help string, f func() int64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "snapfs_" + name, Help: help}, func() float64 { return float64(f()) }))
	}
	s := d.stats
	counter("cache_hits_total", "Blocks answered by the memory cache.", s.Hits.Load)
	counter("cache_misses_total", "Blocks with data that were not in the memory cache.", s.Misses.Load)
	counter("shared_fetch_blocks_total", "Missed blocks taken from another reader's fetch.", s.Shared.Load)
	counter("zero_bytes_total", "Bytes of zero or unallocated blocks served without a fetch.", s.ZeroBytes.Load)
	counter("fetches_total", "Image reads issued by demand and read-ahead.", s.Fetches.Load)
	counter("fetched_bytes_total", "Guest bytes read by successful fetches.", s.BytesFetched.Load)
	counter("readahead_bytes_total", "Bytes read ahead of sequential readers.", s.ReadaheadBytes.Load)
	counter("fetch_errors_total", "Fetches that failed.", s.FetchErrors.Load)
	gauge("fetches_in_flight", "Fetches under way.", s.InFlight.Load)
	m := d.metrics
	counter("store_gets_total", "Ranged GETs sent to the object store.", m.Gets.Load)
	counter("store_read_bytes_total", "Bytes the object store returned.", m.BytesRead.Load)
	counter("store_errors_total", "Object-store requests that failed.", m.Errors.Load)
	gauge("store_reads_in_flight", "Object-store reads under way.", m.InFlight.Load)
	if d.mem != nil {
		mem := d.mem
		st := func(f func(cache.MemoryStats) int64) func() int64 { return func() int64 { return f(mem.Stats()) } }
		gauge("cache_used_bytes", "Bytes held by the memory cache.", st(func(v cache.MemoryStats) int64 { return v.Used }))
		gauge("cache_capacity_bytes", "Byte budget of the memory cache.", st(func(v cache.MemoryStats) int64 { return v.Capacity }))
		counter("cache_evicted_total", "Blocks evicted from the memory cache.", st(func(v cache.MemoryStats) int64 { return v.Evicted }))
	}
	return reg
}

// serveMetrics serves /metrics on addr in the background.
func serveMetrics(addr string, d *devices) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--metrics %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(metricsRegistry(d), promhttp.HandlerOpts{}))
	// Go's profiler beside the counters, as Prometheus and etcd serve it:
	// where a slow read spends its CPU is the next question after the
	// counters. The endpoint listens on loopback unless told otherwise.
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	fmt.Fprintf(os.Stderr, "snapfs: metrics on http://%s/metrics\n", l.Addr())
	go func() {
		if err := http.Serve(l, mux); err != nil && !errors.Is(err, net.ErrClosed) {
			slog.Warn("metrics server stopped", "err", err)
		}
	}()
	return nil
}
