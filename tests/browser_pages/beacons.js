// Every navigator.sendBeacon call of this page, kept in localStorage ("beacons"): the
// browser reports no request of a page that is gone, so the test reads them from the
// next page of this origin. Loaded before the SDK, it only records and passes them on.
(() => {
  const send = navigator.sendBeacon.bind(navigator)
  navigator.sendBeacon = (url, data) => {
    const queued = send(url, data)
    const seen = JSON.parse(localStorage.getItem('beacons') || '[]')
    seen.push({url: String(url), type: data?.type ?? typeof data, size: data?.size ?? null, queued})
    localStorage.setItem('beacons', JSON.stringify(seen))
    return queued
  }
})()
