//go:build race

package disk

// raceEnabled: the race detector slows every goroutine several times,
// which changes the timing that tests of fetch sizing depend on.
const raceEnabled = true
