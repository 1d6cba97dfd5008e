// Copy buttons, confirmations and phone-number progress. No framework, no CDN: the portal
// must work behind a hospital proxy and under a strict Content-Security-Policy.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  return Promise.resolve();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  copyText(source.textContent.trim()).then(
    () => { button.textContent = "Copied"; button.classList.add("copied"); },
    () => { button.textContent = "Select and copy"; },
  );
});

document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

function watchJob(box) {
  const url = box.dataset.jobUrl;
  const bar = box.querySelector("progress");
  const text = box.querySelector(".job-text");
  let failures = 0;
  const tick = async () => {
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(String(response.status));
      const job = await response.json();
      failures = 0;
      bar.value = job.progress_percent;
      text.textContent = job.progress_text;
      if (job.status === "active" || job.status === "failed") {
        window.location.reload();
        return;
      }
    } catch (err) {
      failures += 1;
      text.textContent = "Lost contact with the portal; retrying…";
    }
    window.setTimeout(tick, Math.min(1000 * (1 + failures), 10000));
  };
  window.setTimeout(tick, 1000);
}

document.querySelectorAll("[data-job-url]").forEach(watchJob);
