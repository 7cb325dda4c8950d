// The "Copy as code" panel: one tab per language (snippets.js writes the code), a Copy button.
import { BUILDERS } from "./snippets.js";

const $ = (id) => document.getElementById(id);

/** Wire the panel's tabs and Copy button; returns render(context) (null context: no form yet). */
export function codeBox() {
  const tabs = [...document.querySelectorAll("#code-tabs [role=tab]")];
  const copied = $("code-copied");
  const panel = (tab) => $(tab.getAttribute("aria-controls"));

  function select(chosen) {
    for (const tab of tabs) {
      const on = tab === chosen;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      panel(tab).hidden = !on;
    }
    copied.textContent = "";
  }
  for (const [index, tab] of tabs.entries()) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(index + step + tabs.length) % tabs.length];
      select(next);
      next.focus();
    });
  }

  $("code-copy").addEventListener("click", async () => {
    const shown = tabs.find((tab) => tab.getAttribute("aria-selected") === "true");
    const code = panel(shown).querySelector("code");
    try {
      await navigator.clipboard.writeText(code.textContent);
      copied.textContent = "Copied.";
    } catch {
      // No clipboard access (an insecure origin): select it for the user to copy.
      getSelection().selectAllChildren(code);
      copied.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
    }
  });

  return function render(context) {
    for (const tab of tabs) {
      const code = panel(tab).querySelector("code");
      code.textContent = context ? BUILDERS[tab.dataset.lang](context) : "";
    }
    copied.textContent = "";
  };
}
