package harness

import (
	"errors"
	"net"
	"testing"
)

// A MinIO whose port another process took while it was down fails to
// start with errPortInUse (which StartMinIO and Start retry), and starts
// again on the same port once the port is free.
func TestStartPortInUse(t *testing.T) {
	if _, err := FindMinIO(); err != nil {
		t.Skip(err)
	}
	m := StartMinIO(t)
	m.MakeBucket(t, "before")
	m.Stop()
	l, err := net.Listen("tcp", m.Endpoint)
	if err != nil {
		t.Fatalf("taking MinIO's port: %v", err)
	}
	err = m.start()
	if !errors.Is(err, errPortInUse) {
		l.Close()
		t.Fatalf("start with the port taken: %v, want errPortInUse", err)
	}
	l.Close()
	m.Start(t)
	if !m.Running() {
		t.Fatal("MinIO not running after the port was freed")
	}
	m.MakeBucket(t, "after")
}
