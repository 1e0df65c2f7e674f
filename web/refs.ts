// Reference images for edits: chosen with the file picker or dropped, read as data URIs (what image_urls accepts),
// shown as thumbnails with a remove button each.
import type { Reference } from './request.ts';

const TYPES = ['image/png', 'image/jpeg', 'image/webp'];

function readDataUri(file: File): Promise<string> {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(new Error(`could not read ${file.name}`));
    r.readAsDataURL(file);
  });
}

function imageSize(src: string): Promise<{ width: number; height: number }> {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => reject(new Error('not a readable image'));
    img.src = src;
  });
}

/** Read files into references; returns the ones that fit and a message for each one refused. */
export async function readReferences(files: File[], room: number, max: number): Promise<{ refs: Reference[]; problems: string[] }> {
  const refs: Reference[] = [];
  const problems: string[] = [];
  for (const f of files) {
    if (!TYPES.includes(f.type)) {
      problems.push(`${f.name}: only PNG, JPEG and WebP images can be references`);
      continue;
    }
    if (refs.length >= room) {
      problems.push(`${f.name}: at most ${max} reference images`);
      continue;
    }
    try {
      const dataUri = await readDataUri(f);
      refs.push({ name: f.name, type: f.type, dataUri, ...(await imageSize(dataUri)) });
    } catch (e) {
      problems.push(`${f.name}: ${(e as Error).message}`);
    }
  }
  return { refs, problems };
}

export function renderThumbs(list: HTMLElement, refs: Reference[], onRemove: (i: number) => void): void {
  list.replaceChildren(
    ...refs.map((r, i) => {
      const li = document.createElement('li');
      const img = document.createElement('img');
      img.src = r.dataUri;
      img.alt = `Reference ${i + 1}: ${r.name}`;
      const cap = document.createElement('span');
      cap.textContent = `${r.width}×${r.height}`;
      const rm = document.createElement('button');
      rm.type = 'button';
      rm.className = 'remove';
      rm.textContent = '×';
      rm.setAttribute('aria-label', `Remove ${r.name}`);
      rm.addEventListener('click', () => onRemove(i));
      li.append(img, cap, rm);
      return li;
    }),
  );
}
